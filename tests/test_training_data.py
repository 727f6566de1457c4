"""TrainData's loader: worker processes load items only, so the batches a step sees do not depend on their number;
pinned memory only where there is a CUDA device to copy to."""
import torch

from conftest import ROOT
from libs.config import load_config
from libs.training.data import TrainData
from libs.training.rng import RunRNG


def _data(**train):
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.train.update(dict(batch_size=8), **train)
    config.dataset.random_flip = True                   # exercise the flips as well as the label dropout
    return TrainData(config, 'cpu')


def _stream(data, start, n):
    rng = RunRNG(data.config.seed, 0, 'cpu')
    batches = iter(data.loader(0, 1, start))
    return [data.next_batch(batches, rng) for _ in range(n)]


def test_workers_do_not_change_the_batches():
    inline = _stream(_data(num_workers=0), start=5, n=4)
    workers = _stream(_data(num_workers=2, prefetch_factor=3), start=5, n=4)
    for (za, ya), (zb, yb) in zip(inline, workers):
        assert torch.equal(za, zb) and torch.equal(ya, yb)
    assert (torch.cat([y for _, y in inline]) == 10).any()          # some labels were dropped to the null class


def test_memory_is_pinned_only_for_cuda():
    data = _data(num_workers=0, pin_memory=True)
    assert data.pin_memory is False and data.loader(0, 1, 0).pin_memory is False
    loader = _data(num_workers=2, prefetch_factor=3).loader(0, 1, 0)
    assert loader.prefetch_factor == 3 and loader.num_workers == 2
