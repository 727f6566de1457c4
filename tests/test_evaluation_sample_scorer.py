"""libs/evaluation/sample_scorer.py with a random FID Inception saved by the test: quantisation as the PNGs, features by sample
index, and one vs two gloo processes giving bitwise the same features and metrics."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from PIL import Image

from libs.evaluation.adm_metrics import Reference, sample_metrics
from libs.evaluation.fid import FEATURE_DIMS, load_inception
from libs.evaluation.sample_files import png_array, read_png, write_png
from libs.evaluation.sample_scorer import SampleScorer, to_uint8
from test_evaluation_fid import random_inception_state_dict

N, BATCH = 5, 2
pytestmark = pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')


@pytest.fixture(scope='module')
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp('inception') / 'pt_inception.pth'
    torch.save(random_inception_state_dict(), path)
    return str(path)


@pytest.fixture(scope='module')
def model(weights_path):
    return load_inception(weights_path, 'cpu')


def images_uint8(n=N, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8))


def reference(seed=1):
    rng = np.random.default_rng(seed)
    return Reference('ref.npz', np.full(2048, 0.2), np.eye(2048), np.full(2023, 0.2), np.eye(2023),
                     np.abs(rng.normal(size=(6, 2048))).astype(np.float32))


def test_to_uint8_is_what_torchvision_save_image_writes(tmp_path):
    x = torch.rand(3, 3, 5, 6)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.5 / 255, 254.5 / 255])     # ends and rounding ties
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and torch.equal(to_uint8(u), u)
    for k in range(3):
        torchvision.utils.save_image(x[k], tmp_path / f'{k}.png')
        assert np.array_equal(np.asarray(Image.open(tmp_path / f'{k}.png')), u[k].permute(1, 2, 0).numpy())
    for bad in (torch.zeros(3, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4, dtype=torch.int32)):
        with pytest.raises(ValueError, match='expected'):
            to_uint8(bad)


def test_features_are_gathered_in_sample_order(model):
    images = images_uint8()
    expected = model.activations(images.float() / 255)
    scorer = SampleScorer(model, N)
    for start in (4, 2, 0):                                          # batches added out of order
        scorer.add(images[start:start + BATCH], range(start, min(start + BATCH, N)))
    assert len(scorer) == N
    features = scorer.gather()
    assert {k: v.shape for k, v in features.items()} == {'pool': (N, 2048), 'spatial': (N, 2023), 'logits': (N, 1008)}
    for kind, value in expected.items():
        np.testing.assert_allclose(features[kind], value.numpy(), rtol=1e-4, atol=1e-5)
    same_batch = SampleScorer(model, BATCH)                          # float in [0, 1] is quantised as the PNGs
    same_batch.add(images[:BATCH].float() / 255, range(BATCH))
    assert all(np.array_equal(v, features[k][:BATCH]) for k, v in same_batch.gather().items())
    grey = SampleScorer(model, 1)
    grey.add(images[:1, :1], [0])
    np.testing.assert_array_equal(grey.gather()['pool'],
                                  model.activations(images[:1, :1].expand(-1, 3, -1, -1).float() / 255)['pool'].numpy())


class MeanFeatures(torch.nn.Module):
    """A stand-in network (the checks below do not look at feature values)."""

    def __init__(self):
        super().__init__()
        self.register_buffer('anchor', torch.zeros(1))

    def activations(self, x):
        return {k: x.mean((1, 2, 3))[:, None].expand(-1, d) for k, d in FEATURE_DIMS.items()}


def test_images_from_files_and_from_memory_give_bitwise_equal_features(model, tmp_path):
    images = images_uint8(BATCH)
    for i, image in enumerate(images):
        write_png(png_array(image), str(tmp_path / f'{i}.png'))
    from_memory, from_files = SampleScorer(model, BATCH), SampleScorer(model, BATCH)
    from_memory.add(images, range(BATCH))
    from_files.add(torch.stack([read_png(str(tmp_path / f'{i}.png')) for i in range(BATCH)]), range(BATCH))
    in_hwc_layout = SampleScorer(model, BATCH)                      # a permuted (channels-last) view
    in_hwc_layout.add(images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), range(BATCH))
    for other in (from_files, in_hwc_layout):
        assert all(np.array_equal(v, other.gather()[k]) for k, v in from_memory.gather().items())


def test_missing_and_repeated_samples_are_errors():
    images = images_uint8(4)
    scorer = SampleScorer(MeanFeatures(), 4)
    scorer.add(images[:2], [0, 1])
    with pytest.raises(RuntimeError, match=r'2 missing \(\[2, 3\]'):
        scorer.gather()
    scorer.add(images[1:3], [1, 2])
    with pytest.raises(RuntimeError, match=r'1 missing \(\[3\].*1 added more than once \(\[1\]'):
        scorer.gather()
    with pytest.raises(ValueError, match=r'in \[0, 4\)'):
        scorer.add(images[:1], [4])
    with pytest.raises(ValueError, match='2 images but 1 indices'):
        scorer.add(images[:2], [3])


def _worker(rank, world, init_file, weights, images, ref, out):
    torch.set_num_threads(1)                # the same kernels in every process
    if world > 1:
        dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    scorer = SampleScorer(load_inception(weights, 'cpu'), len(images))
    batches = [range(s, min(s + BATCH, len(images))) for s in range(0, len(images), BATCH)]
    for indices in batches[rank::world]:    # round-robin, as the eval script deals its batches
        scorer.add(images[indices.start:indices.stop], indices)
    features = scorer.gather()
    metrics, _ = scorer.score(ref)
    np.savez(f'{out}_{world}_{rank}.npz', **features, **{f'metric_{k}': v for k, v in metrics.items()})
    if world > 1:
        dist.destroy_process_group()


def test_one_and_two_processes_give_bitwise_equal_features_and_metrics(tmp_path, weights_path):
    images, ref, out = images_uint8(), reference(), str(tmp_path / 'scores')
    for world in (1, 2):
        mp.spawn(_worker, args=(world, str(tmp_path / f'init{world}'), weights_path, images, ref, out), nprocs=world)
    results = [dict(np.load(f'{out}_{world}_{rank}.npz')) for world, rank in ((1, 0), (2, 0), (2, 1))]
    assert {'metric_fid', 'metric_sfid', 'metric_inception_score', 'metric_precision', 'metric_recall'} <= set(results[0])
    for other in results[1:]:
        assert set(other) == set(results[0])
        assert all(np.array_equal(other[k], results[0][k]) for k in results[0]), 'not bitwise equal'
    expected, _ = sample_metrics({k: results[0][k] for k in ('pool', 'spatial', 'logits')}, ref)
    assert all(results[0][f'metric_{k}'] == v for k, v in expected.items())
