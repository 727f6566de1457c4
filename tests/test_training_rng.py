"""Per-process generators: distinct streams per rank, continued exactly from a checkpoint, reseeded loudly otherwise.

The generators are device-generic (torch.Generator(device=...)); here they run on the CPU. On a GPU the `device`
generator is a CUDA generator, whose state (a CPU byte tensor) is saved and restored the same way.
"""
import logging

import torch

from libs.training.rng import RunRNG


def _draw(rng):
    return torch.rand(4, generator=rng.data), torch.randn(4, generator=rng.device, device=rng.device.device)


def test_every_process_and_stream_draws_different_numbers():
    a, b = RunRNG(1234, 0, 'cpu'), RunRNG(1234, 1, 'cpu')
    (da, ea), (db, eb) = _draw(a), _draw(b)
    assert not torch.equal(da, db) and not torch.equal(ea, eb)
    assert a.device.device == torch.device('cpu') and a.device_type == 'cpu'
    assert not torch.equal(RunRNG(1234, 0, 'cpu').data.get_state(), RunRNG(1234, 0, 'cpu').device.get_state())


def test_a_checkpoint_continues_both_streams():
    world = [RunRNG(7, r, 'cpu') for r in range(2)]
    for rng in world:
        _draw(rng)
    saved = RunRNG.file_state([rng.state() for rng in world], 'cpu')
    expected = [_draw(rng) for rng in world]
    for rank in range(2):
        again = RunRNG(7, rank, 'cpu')
        again.restore(saved, world_size=2, step=10)
        got = _draw(again)
        assert torch.equal(got[0], expected[rank][0]) and torch.equal(got[1], expected[rank][1])


def test_another_process_count_or_device_reseeds_with_a_warning(caplog):
    saved = RunRNG.file_state([RunRNG(7, r, 'cpu').state() for r in range(2)], 'cpu')
    with caplog.at_level(logging.WARNING):
        rng = RunRNG(7, 0, 'cpu')
        rng.restore(saved, world_size=4, step=10)
    assert 'written by 2 processes, now 4' in caplog.text
    assert not torch.equal(rng.data.get_state(), saved['data'][0])

    saved['device_type'] = 'cuda'                   # a GPU checkpoint resumed on the CPU: the data stream continues
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rng = RunRNG(7, 1, 'cpu')
        rng.restore(saved, world_size=2, step=10)
    assert 'written on cuda, now on cpu' in caplog.text
    assert torch.equal(rng.data.get_state(), saved['data'][1])
    assert not torch.equal(rng.device.get_state(), saved['device'][1])
