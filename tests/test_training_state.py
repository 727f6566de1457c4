"""TrainState, TrainData and TrainStep in one process: a step draws only from the run's own generators, the
autoencoder's posterior samples come from the device generator, save and resume restore everything, and a
checkpoint of another launch stops the run."""
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from libs.data.autoencoder import FrozenAutoencoder
from libs.training.checkpoint import CheckpointError
from libs.config import load_config
from libs.training.data import TrainData
from libs.training.launch import make_accelerator
from libs.training.rng import RunRNG
from libs.training.state import TrainState
from libs.training.step import TrainStep


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
