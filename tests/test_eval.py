"""eval_ldm_discrete.py end to end on CPU with a tiny random DiM, a tiny LDM-format VAE and a random FID Inception,
all written by the test (nothing downloaded): 1 and 2 processes, restart, other runs, missing files, upsampling."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval_ldm_discrete as ev
import libs.evaluation.evaluate
from conftest import ROOT
from libs import get_nnet
from libs.evaluation.adm_metrics import load_reference, sample_metrics, save_reference
from libs.config import load_config
from libs.evaluation.evaluate import default_output_dir
from libs.evaluation.fid import FEATURE_DIMS, load_inception
from libs.files import FolderInUse, NotEnoughSpace, UnreadableFile
from libs.sampling import SamplingSpec
from small_disk import fill, tmpfs
from tiny_assets import write_config, write_scoring_assets

SCRIPT = str(ROOT / 'eval_ldm_discrete.py')
TINY = dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=3, in_channels=4, sample_size=4,
            num_embeds_ada_norm=10)
N, BATCH = 7, 3  # three batches, the last one partial

pytestmark = pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('assets'))
    paths = write_scoring_assets(root)
    paths.update(nnet=os.path.join(root, 'ckpts', '100.ckpt', 'nnet_ema.pth'),
                 stats=os.path.join(root, 'fid_stats.npz'), full_stats=os.path.join(root, 'full_stats.npz'))
    os.makedirs(os.path.dirname(paths['nnet']))
    torch.save(get_nnet(**TINY).state_dict(), paths['nnet'])
    np.savez(paths['stats'], mu=np.zeros(2048), sigma=np.eye(2048))          # a U-ViT-style file: FID only
    rng = np.random.default_rng(0)                                           # everything ADM's suite needs:
    save_reference(paths['full_stats'], np.full(2048, 0.1), np.eye(2048), np.full(2023, 0.1), np.eye(2023),
                   np.abs(rng.normal(size=(12, 2048))).astype(np.float32))
    paths['config'] = write_config(
        os.path.join(root, 'tiny_eval.py'), seed=7, z_shape=(4, 4, 4),  # the tiny VAE upsamples x2: 8x8 images
        autoencoder=dict(pretrained_path=paths['vae']), nnet=TINY,
        dataset=dict(name='imagenet256_features', path='unused', fid_stat=paths['stats']),
        sample=dict(sample_steps=50, n_samples=N, mini_batch_size=BATCH, algorithm='dpm_solver', cfg=True,
                    scale=0.4, path='', inception_path=paths['inception']))
    return paths


def tiny_config(assets, **sample):
    config = load_config(assets['config'])
    config.sample.sample_steps = 2
    config.sample.update(sample)
    return config


def run_in_process(assets, out, config=None, nnet=None, **kwargs):
    return ev.evaluate(config or tiny_config(assets), nnet or assets['nnet'], str(out), name='tiny_eval', **kwargs)


def pngs(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder) if name.endswith('.png')}


class PixelFeatures(torch.nn.Module):
    """Stand-in for FIDInception.activations: every feature is the images' pixels, tiled (the real network runs in
    the end-to-end test)."""

    def __init__(self):
        super().__init__()
        self.register_buffer('anchor', torch.zeros(1))

    def activations(self, x):
        flat = x.flatten(1)
        return {k: flat.repeat(1, -(-d // flat.shape[1]))[:, :d] for k, d in FEATURE_DIMS.items()}


@pytest.fixture
def fast_fid(monkeypatch):
    monkeypatch.setattr(libs.evaluation.evaluate, 'load_inception', lambda path, device: PixelFeatures())


def folder_features(folder, n):
    """The stand-in's features of the PNGs 0..n-1 as written: the independent (file) path."""
    images = torch.stack([torch.from_numpy(np.array(Image.open(folder / f'{i}.png').convert('RGB'))).permute(2, 0, 1)
                          for i in range(n)])
    return {k: v.numpy() for k, v in PixelFeatures().activations(images.float() / 255).items()}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_one_and_two_processes_write_identical_images_and_scores(assets, tmp_path):
    # OMP_NUM_THREADS=1 for both: the same kernels (PyTorch does not promise bitwise equality across thread counts).
    env = dict(os.environ, OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1', HF_HOME=str(tmp_path / 'hf'))
    args = [f'--config={assets["config"]}', f'--nnet_path={assets["nnet"]}', '--config.sample.sample_steps=2',
            f'--config.dataset.fid_stat={assets["full_stats"]}']
    launchers = {1: [sys.executable],
                 2: [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                     '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                     '--main_process_port', str(free_port())]}
    results = {}
    for procs, launcher in launchers.items():
        out = tmp_path / f'p{procs}'
        npz = ['--npz'] if procs == 2 else []
        run = subprocess.run([*launcher, SCRIPT, *args, f'--output_dir={out}', *npz], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-5000:]
        assert f'results in {out}/results.json' in run.stderr and 'FID' in run.stderr and 'sFID' in run.stderr
        results[procs] = json.loads((out / 'results.json').read_text())
        extra = ['samples.npz'] if npz else []
        assert sorted(os.listdir(out)) == sorted([f'{i}.png' for i in range(N)] + ['run.json', 'results.json',
                                                                                 'run.lock', *extra])
    assert pngs(tmp_path / 'p1') == pngs(tmp_path / 'p2')
    for procs, r in results.items():
        assert math.isfinite(r['fid']) and r['fid'] > 0
        assert (r['num_processes'], r['n_samples'], r['images_written'], r['steps']) == (procs, N, N, 2)
        assert (r['sampler'], r['guidance'], r['device']) == ('dpm_solver', 0.4, 'cpu')
        assert r['images_per_s'] > 0 and r['wall_time_s'] > 0 and r['metrics_not_computed'] == {}
        assert r['reference'] == assets['full_stats']
    metrics = ('fid', 'sfid', 'inception_score', 'precision', 'recall')
    # Features gathered by sample index and computed in the same batches: bitwise the same scores.
    assert {k: results[1][k] for k in metrics} == {k: results[2][k] for k in metrics}

    # The independent path: the PNGs read back from disk, the real Inception in other batches.
    model = load_inception(assets['inception'], 'cpu')
    images = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / 'p1' / f'{i}.png'))).permute(2, 0, 1)
                          for i in range(N)])
    features = {k: v.numpy() for k, v in model.activations(images.float() / 255).items()}
    expected, _ = sample_metrics(features, load_reference(assets['full_stats']))
    for k in metrics:
        assert results[1][k] == pytest.approx(expected[k], rel=1e-5, abs=1e-9), k
    with np.load(tmp_path / 'p2' / 'samples.npz') as f:               # ADM's sample batch layout
        assert f.files == ['arr_0'] and f['arr_0'].dtype == np.uint8
        np.testing.assert_array_equal(f['arr_0'], images.permute(0, 2, 3, 1).numpy())
    assert results[2]['npz'] == str(tmp_path / 'p2' / 'samples.npz') and 'npz' not in results[1]
    with Image.open(tmp_path / 'p1' / '0.png') as img:
        assert img.size == (8, 8) and img.mode == 'RGB'
    run = json.loads((tmp_path / 'p1' / 'run.json').read_text())
    assert (run['config'], run['seed'], run['steps'], run['n_samples']) == ('tiny_eval', 7, 2, N)


def test_default_output_dir(assets):
    config = tiny_config(assets)
    assert default_output_dir(config, 'tiny_eval', assets['nnet']) == 'workdir/tiny_eval/eval/100.ckpt_nnet_ema'
    config.sample.path = 'elsewhere'
    assert default_output_dir(config, 'tiny_eval', assets['nnet']) == 'elsewhere'


def test_restart_writes_only_missing_images_and_scores_the_folder(assets, tmp_path, fast_fid):
    out = tmp_path / 'out'
    config = tiny_config(assets)
    config.dataset.fid_stat = assets['full_stats']
    first = run_in_process(assets, out, config)
    before = pngs(out)
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in before}
    os.remove(out / '4.png')                       # batch 1 = images 3, 4, 5
    (out / '.5.png.123.tmp').write_bytes(b'half')  # a write interrupted by a kill
    (out / '.samples.npz.9.tmp').write_bytes(b'')  # an interrupted --npz export
    results = run_in_process(assets, out, config)
    assert results['images_written'] == 1 and pngs(out) == before
    assert not (out / '.5.png.123.tmp').exists() and not (out / '.samples.npz.9.tmp').exists()
    assert all(os.stat(out / name).st_mtime_ns == t for name, t in mtimes.items() if name != '4.png')
    metrics = ('fid', 'sfid', 'inception_score', 'precision', 'recall')
    assert {k: results[k] for k in metrics} == {k: first[k] for k in metrics}

    # What is scored is what the folder holds: an image on disk (3.png, in the re-sampled batch 1, and 0.png, in
    # a complete batch) counts as written, not as it would be sampled again.
    for name in ('0.png', '3.png'):
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(out / name)
    os.remove(out / '4.png')
    results = run_in_process(assets, out, config)
    assert results['images_written'] == 1
    expected, _ = sample_metrics(folder_features(out, N), load_reference(assets['full_stats']))
    assert {k: results[k] for k in metrics} == {k: expected[k] for k in metrics} != {k: first[k] for k in metrics}
    assert run_in_process(assets, out, config)['images_written'] == 0   # complete: scores only


def test_results_name_the_metrics_the_reference_cannot_give(assets, tmp_path, fast_fid, caplog):
    caplog.set_level('INFO')
    results = run_in_process(assets, tmp_path / 'out')             # mu/sigma only, as U-ViT's fid_stats files
    assert math.isfinite(results['fid']) and results['inception_score'] >= 1
    assert set(results['metrics_not_computed']) == {'sfid', 'precision', 'recall'}
    assert all(assets['stats'] in why and 'fid_reference_stats.py' in why
               for why in results['metrics_not_computed'].values())
    assert 'sfid' not in results and 'precision' not in results
    assert json.loads((tmp_path / 'out' / 'results.json').read_text()) == results
    assert 'no sfid:' in caplog.text and 'no precision, recall:' in caplog.text and 'IS ' in caplog.text


def test_a_failed_png_write_stops_the_run(assets, tmp_path, fast_fid, monkeypatch):
    import libs.evaluation.sample_files

    def failing_write(array, path):
        if path.endswith('/4.png'):
            raise OSError('disk full')
        real_write(array, path)

    real_write = libs.evaluation.sample_files.write_png
    monkeypatch.setattr(libs.evaluation.sample_files, 'write_png', failing_write)
    with pytest.raises(RuntimeError, match='writing sample PNGs failed: disk full'):
        run_in_process(assets, tmp_path / 'out')
    assert not (tmp_path / 'out' / 'results.json').exists() and not (tmp_path / 'out' / '4.png').exists()


def test_images_of_another_run_are_refused_unless_overwrite(assets, tmp_path, fast_fid):
    out = tmp_path / 'out'
    run_in_process(assets, out, tiny_config(assets, n_samples=2))
    other = tiny_config(assets, n_samples=2)
    other.seed = 8
    with pytest.raises(RuntimeError, match=r"(?s)another run.*'seed': \(7, 8\).*--overwrite"):
        run_in_process(assets, out, other)
    assert json.loads((out / 'run.json').read_text())['seed'] == 7
    first = pngs(out)
    run_in_process(assets, out, other, overwrite=True)
    assert json.loads((out / 'run.json').read_text())['seed'] == 8 and pngs(out) != first

    (out / 'run.json').unlink()
    with pytest.raises(RuntimeError, match='no run.json'):
        run_in_process(assets, out, other)
    (out / 'photo.jpg').write_bytes(b'')
    with pytest.raises(RuntimeError, match=r"photo\.jpg"):       # never deleted, even with --overwrite
        run_in_process(assets, out, other, overwrite=True)


HINTS = dict(nnet='nnet_ema.pth', vae='stable-diffusion/', inception='pt_inception-2015-12-05', stats='fid_stats/')


@pytest.mark.parametrize('missing', [['nnet'], ['vae'], ['inception'], ['stats'], list(HINTS)], ids='+'.join)
def test_missing_files_are_named_before_sampling(assets, tmp_path, missing):
    gone = {k: str(tmp_path / f'missing_{k}.pth') for k in missing}
    config = tiny_config(assets)
    if 'vae' in gone:
        config.autoencoder.pretrained_path = gone['vae']
    if 'inception' in gone:
        config.sample.inception_path = gone['inception']
    if 'stats' in gone:
        config.dataset.fid_stat = gone['stats']
    with pytest.raises(FileNotFoundError) as err:
        run_in_process(assets, tmp_path / 'out', config, nnet=gone.get('nnet'))
    lines = str(err.value).splitlines()
    assert len(lines) == len(missing)                          # every missing file at once, each with its source
    for k, path in gone.items():
        assert any(path in line and HINTS[k] in line for line in lines), (k, lines)
    assert not (tmp_path / 'out').exists()                     # nothing was sampled


def test_checkpoint_of_another_config_lists_key_differences(assets, tmp_path):
    deeper = tmp_path / 'deeper.pth'
    torch.save(get_nnet(**{**TINY, 'num_layers': 5}).state_dict(), deeper)
    with pytest.raises(RuntimeError, match=r"(?s)unexpected keys \(\d+\): \['transformer_blocks\.3\."):
        run_in_process(assets, tmp_path / 'out', nnet=str(deeper))
    wider = tmp_path / 'wider.pth'
    torch.save(get_nnet(**{**TINY, 'attention_head_dim': 16}).state_dict(), wider)
    with pytest.raises(RuntimeError, match=r'shape mismatches .*checkpoint \(1, 6, 16\) vs model \(1, 6, 32\)'):
        run_in_process(assets, tmp_path / 'out', nnet=str(wider))


def test_upsample_sampler_loads_a_base_grid_checkpoint(assets, tmp_path):
    base = dict(TINY, pad_token_schedules=['dec_split', 'rho_pad'])
    path = tmp_path / '512' / 'nnet_ema.pth'                     # a "512" model: 2x2 token table
    path.parent.mkdir()
    torch.save(get_nnet(**base).state_dict(), path)
    config = tiny_config(assets, algorithm='dpm_solver_upsample_g', n_samples=2, mini_batch_size=1, scale=3.0,
                         ug_theta=1.0, ug_eta=0.3, ug_T=1.0, vis_label=3)
    config.z_shape = (4, 8, 8)                                    # x2: 4x4 token grid, 16x16 images
    config.nnet.update(base, sample_size=8, multi_times=2, num_patches=[16, 4, 4])
    results = run_in_process(assets, tmp_path / 'out', config, nnet=str(path))
    assert results['sampler'] == 'dpm_solver_upsample_g' and math.isfinite(results['fid'])
    run = json.loads((tmp_path / 'out' / 'run.json').read_text())
    assert (run['multi_times'], run['vis_label'], run['ug_eta']) == (2, 3, 0.3)
    with Image.open(tmp_path / 'out' / '1.png') as img:
        assert img.size == (16, 16)
    assert SamplingSpec.from_config(config).labels(range(5)).tolist() == [3] * 5


def test_pixel_space_digits_config_writes_the_digits_report(assets, tmp_path, monkeypatch):
    calls = []

    def fake_report(images, labels, out_dir, extra=None):    # the real one trains a classifier (~15 s)
        calls.append((images, labels))
        path = os.path.join(out_dir, 'report.json')
        with open(path, 'w') as f:
            json.dump({'sample_accuracy': 0.5}, f)
        return path

    monkeypatch.setattr(libs.evaluation.evaluate, 'write_digits_report', fake_report)
    config = tiny_config(assets, n_samples=3)
    del config['autoencoder']
    config.z_shape = (1, 8, 8)
    config.nnet.update(in_channels=1, sample_size=8)
    config.dataset = dict(name='digits', resolution=8)
    nnet = tmp_path / 'digits.pth'
    torch.save(get_nnet(**{**TINY, 'in_channels': 1, 'sample_size': 8}).state_dict(), nnet)
    results = run_in_process(assets, tmp_path / 'out', config, nnet=str(nnet))
    assert 'fid' not in results and results['sample_accuracy'] == 0.5
    images, labels = calls[0]
    assert images.shape == (3, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(labels, SamplingSpec.from_config(config).labels(range(3)))
    with Image.open(tmp_path / 'out' / '2.png') as img:
        assert img.mode == 'L' and np.array_equal(np.asarray(img), (images[2, 0] * 255).round().byte().numpy())


def test_compiled_network_gives_the_eager_images(assets, tmp_path, fast_fid, caplog):
    """config.compile='default': the network through torch.compile (one graph), the images of the eager run."""
    eager = run_in_process(assets, tmp_path / 'eager', tiny_config(assets, n_samples=4))
    config = tiny_config(assets, n_samples=4)
    config.compile = 'default'
    with caplog.at_level('INFO', logger='libs.model.compile'):
        compiled = run_in_process(assets, tmp_path / 'compiled', config)
    assert any("torch.compile mode 'default', fullgraph=True" in r.getMessage() for r in caplog.records)
    for i in range(4):
        a, b = (np.asarray(Image.open(tmp_path / d / f'{i}.png'), np.int16) for d in ('eager', 'compiled'))
        assert np.abs(a - b).max() <= 2
    assert compiled['fid'] == pytest.approx(eager['fid'], rel=1e-2)


def test_unknown_compile_mode_is_refused_before_sampling(assets, tmp_path):
    config = tiny_config(assets, n_samples=4)
    config.compile = 'fast'
    with pytest.raises(ValueError, match="config.compile must be one of 'none', 'default'"):
        run_in_process(assets, tmp_path / 'out', config)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('which, damage, problem', [
    ('nnet', lambda b: b[:len(b) // 2], r'is truncated \([\d,]+ bytes; the end of its zip archive is missing\)'),
    ('nnet', lambda b: b'<html>not found</html>', r"is not a torch file \(it starts with b'<html>no'"),
    ('stats', lambda b: b[:len(b) // 3], r'is truncated \([\d,]+ bytes; the end of its zip archive is missing\)'),
], ids=['truncated weights', 'foreign weights', 'truncated statistics'])
def test_unreadable_inputs_are_named_before_sampling(assets, tmp_path, which, damage, problem):
    source = assets['nnet'] if which == 'nnet' else assets['stats']
    copy = tmp_path / os.path.basename(source)
    copy.write_bytes(damage(open(source, 'rb').read()))
    config = tiny_config(assets)
    if which == 'stats':
        config.dataset.fid_stat = str(copy)
    with pytest.raises(UnreadableFile, match=f'^{copy}: {problem}'):
        run_in_process(assets, tmp_path / 'out', config, nnet=str(copy) if which == 'nnet' else None)
    assert not (tmp_path / 'out').exists()


def test_a_second_evaluation_into_a_busy_folder_is_refused(assets, tmp_path, fast_fid):
    out = tmp_path / 'out'
    holder = subprocess.Popen([sys.executable, '-c', f'import sys, time; sys.path.insert(0, {str(ROOT)!r}); '
                               f'from libs.files import FolderLock; FolderLock({str(out)!r}, "evaluation run").acquire(); '
                               'print("held", flush=True); time.sleep(600)'], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(FolderInUse, match=rf'{out} is in use by a evaluation run on host .*, pid {holder.pid}'):
            run_in_process(assets, out)
        assert os.listdir(out) == ['run.lock']
    finally:
        holder.kill()
        holder.wait()
    run_in_process(assets, out)                                  # free again once its holder has gone


def test_an_output_folder_without_room_is_refused_and_a_failed_write_named(assets, tmp_path, fast_fid, monkeypatch):
    with tmpfs(tmp_path / 'disk', 256 << 10) as disk:
        out = disk / 'out'
        out.mkdir()
        fill(disk, leave=12 << 10)                                # room for run.lock, run.json and one PNG
        with pytest.raises(NotEnoughSpace, match=rf'^{N} PNG images \(about \d+ bytes each\) needs about .* but {out} '
                                                 r'has 4.1 KB \(4,096 bytes\) free'):
            run_in_process(assets, out)
        assert sorted(os.listdir(out)) == ['run.json', 'run.lock']
        os.remove(disk / 'filler')
        check = libs.evaluation.evaluate.check_folder_space
        monkeypatch.setattr(libs.evaluation.evaluate, 'check_folder_space',      # the disk fills after the check
                            lambda *args: (check(*args), fill(disk, leave=0)))
        with pytest.raises(RuntimeError, match=rf'writing sample PNGs failed: cannot write {out}/0\.png: No space left '
                                               rf'on device \(the filesystem is full; 0 bytes free in {out}\)'):
            run_in_process(assets, out)
        assert sorted(os.listdir(out)) == ['run.json', 'run.lock']           # no half-written PNG
