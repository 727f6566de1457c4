"""TrainState, TrainData and TrainStep in one process: a step draws only from the run's own generators, the
autoencoder's posterior samples come from the device generator, save and resume restore everything, a checkpoint
of another launch stops the run, and a save that does not fit or fails (full tmpfs where the test may mount one,
simulated ENOSPC, read-only filesystem) leaves the earlier checkpoints as they were."""
import contextlib
import errno
import os
from types import SimpleNamespace

import pytest
import torch

import libs.training.checkpoint
import libs.training.state

from conftest import ROOT
from libs.data.autoencoder import FrozenAutoencoder
from libs.files import check_free_space
from libs.training.checkpoint import CheckpointError, load_checkpoint
from libs.config import load_config
from libs.training.data import TrainData
from libs.training.launch import make_accelerator
from libs.training.rng import RunRNG
from libs.training.state import TrainState
from libs.training.step import TrainStep
from small_disk import fill, remount_read_only, simulate_full_disk, tmpfs


@pytest.fixture(scope='module')
def setup():
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.nnet.attention_head_dim, config.nnet.num_layers, config.train.batch_size = 32, 3, 8
    acc = make_accelerator(config)
    return config, acc, TrainData(config, acc.device)


def _run(config, acc, data, root, steps):
    state = TrainState(config, acc, str(root))
    step = TrainStep(config, acc, state, data)
    batches = iter(data.loader(0, 1, state.step))
    losses = [step(batches)[0].item() for _ in range(steps)]
    return state, losses


def test_a_step_draws_from_the_run_generators_only(setup, tmp_path):
    config, acc, data = setup
    state = TrainState(config, acc, str(tmp_path))
    step = TrainStep(config, acc, state, data)
    batches = iter(data.loader(0, 1, 0))
    cpu_state = torch.get_rng_state()
    step(batches)
    assert torch.equal(torch.get_rng_state(), cpu_state)      # the global generator is untouched


def test_posterior_samples_come_from_the_device_generator(setup):
    config, acc, _ = setup
    data = TrainData(config, acc.device)
    data.dataset = SimpleNamespace(kind='moments')
    data.autoencoder = FrozenAutoencoder(torch.nn.Identity())
    moments = torch.randn(3, 8, 4, 4)
    ranks = [RunRNG(config.seed, r, acc.device) for r in (0, 0, 1)]
    cpu_state = torch.get_rng_state()
    z = [data.to_latents(moments, rng) for rng in ranks]
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(z[0], z[1]) and not torch.equal(z[0], z[2])          # per-process streams


def test_save_and_resume_restore_the_whole_state(setup, tmp_path):
    config, acc, data = setup
    first, _ = _run(config, acc, data, tmp_path, 3)
    assert first.save().endswith('3.ckpt')
    resumed = TrainState(config, acc, str(tmp_path))
    assert resumed.step == 3
    for a, b in zip(first.layout.local_tensors(), resumed.layout.local_tensors()):
        assert torch.equal(a, b)
    for a, b in zip(first.ema.tensors, resumed.ema.tensors):
        assert torch.equal(a, b)
    assert torch.equal(first.rng.device.get_state(), resumed.rng.device.get_state())
    assert resumed.lr == first.lr
    # the next step after resuming equals the next step of the uninterrupted state
    batches_a, batches_b = iter(data.loader(0, 1, 3)), iter(data.loader(0, 1, 3))
    loss_a = TrainStep(config, acc, first, data)(batches_a)[0]
    loss_b = TrainStep(config, acc, resumed, data)(batches_b)[0]
    assert torch.equal(loss_a, loss_b)


def test_a_checkpoint_of_a_sharded_launch_stops_an_unsharded_one(setup, tmp_path):
    config, acc, data = setup
    state, _ = _run(config, acc, data, tmp_path, 1)
    path = state.save()
    torch.save({'sharded_by': 'zero2', 'world_size': 8, 'shards': [f'optimizer.rank{r}.pth' for r in range(8)]},
               f'{path}/optimizer.pth')
    with pytest.raises(CheckpointError, match='saved by a zero2 run over 8 processes, this launch is replicated over 1'):
        TrainState(config, acc, str(tmp_path))


def test_the_network_recomputes_as_config_recompute_says(setup, tmp_path):
    config, acc, _ = setup
    chosen = {}
    for mode in ('on', 'off', 'auto'):
        config.recompute = mode
        chosen[mode] = TrainState(config, acc, str(tmp_path / mode)).nnet.recompute
    config.recompute = 'auto'
    assert chosen == {'on': True, 'off': False, 'auto': False}      # the tiny digits network fits in memory



def _state_at_step_4_with_checkpoint_2(config, acc, data, ckpts):
    os.makedirs(ckpts)
    state, _ = _run(config, acc, data, ckpts, 2)
    state.save()
    step, batches = TrainStep(config, acc, state, data), iter(data.loader(0, 1, 2))
    step(batches), step(batches)
    return state


def _only_checkpoint_2_is_left(ckpts):
    assert os.listdir(ckpts) == ['2.ckpt']                                  # the staging folder is gone
    assert load_checkpoint(os.path.join(ckpts, '2.ckpt'))['step.pth'] == 2  # the earlier checkpoint intact


def _not_saved(ckpts, what):
    return (rf'^checkpoint 4 not saved: {what}\. Nothing of it is left on disk; the earlier checkpoints in {ckpts} '
            r'\(\[2\]\) are untouched$')


@pytest.mark.parametrize('disk', ['full tmpfs', 'simulated', 'read-only tmpfs'])
def test_a_write_that_fails_removes_the_partial_checkpoint_and_names_the_file(setup, tmp_path, monkeypatch, disk):
    config, acc, data = setup
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tmpfs(tmp_path / 'disk', 4 << 20)) if 'tmpfs' in disk else tmp_path
        ckpts = os.path.join(root, 'ckpts')
        state = _state_at_step_4_with_checkpoint_2(config, acc, data, ckpts)
        staging = rf'{ckpts}/\.tmp-4-\w+'
        problem = (rf'cannot write {staging}/nnet\.pth: No space left on device \(the filesystem is full; .* free in '
                   rf'{staging}\)')
        if disk == 'full tmpfs':                        # a real full disk: filled up after the free-space check
            monkeypatch.setattr(libs.training.state, 'check_free_space',
                                lambda *args: (check_free_space(*args), fill(root, leave=0)))
        elif disk == 'simulated':                       # writes fail with ENOSPC past 100 kB
            simulate_full_disk(monkeypatch, libs.training.checkpoint, 100_000)
        else:
            remount_read_only(root)
            problem = rf'cannot write {staging}: Read-only file system \(the filesystem is read-only\)'
        with pytest.raises(OSError, match=_not_saved(ckpts, problem)):
            state.save()
        _only_checkpoint_2_is_left(ckpts)


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(setup, tmp_path):
    config, acc, data = setup
    with tmpfs(tmp_path / 'disk', 1600 << 10) as root:
        ckpts = os.path.join(root, 'ckpts')
        state = _state_at_step_4_with_checkpoint_2(config, acc, data, ckpts)
        free = os.statvfs(ckpts).f_bavail * os.statvfs(ckpts).f_frsize
        with pytest.raises(OSError, match=_not_saved(ckpts, rf'checkpoint 4 \(all its files\) needs about .* MB '
                                                            rf'\([\d,]+ bytes\) but {ckpts} has .* \({free:,} bytes\) '
                                                            r'free: free some space \(or write elsewhere\)')) as raised:
            state.save()
        assert raised.value.errno == errno.ENOSPC
        _only_checkpoint_2_is_left(ckpts)
