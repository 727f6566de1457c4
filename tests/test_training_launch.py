"""Launch checks: mismatched process counts, dropped sharding modes, fp16, DeepSpeed settings from the config."""
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from conftest import ROOT
from libs import get_nnet
from libs.config import load_config
from libs.training.launch import (LaunchError, _configure_deepspeed, check_compile, check_launch, forward_autocast,
                                  sharding_kind)


def _acc(n=1, kind=DistributedType.NO, mixed='no', ds=None, fsdp_version=None):
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds),
                            fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version))
    return SimpleNamespace(num_processes=n, distributed_type=kind, mixed_precision=mixed, state=state,
                           device=torch.device('cpu'))


def _ds(**overrides):
    ds = {'train_batch_size': 'auto', 'train_micro_batch_size_per_gpu': 'auto', 'gradient_accumulation_steps': 'auto',
          'zero_optimization': {'stage': 2, 'offload_optimizer': {'device': 'none'}, 'offload_param': {'device': 'none'}},
          'gradient_clipping': 'auto', 'bf16': {'enabled': True}, 'fp16': {'enabled': False}}
    ds.update(overrides)
    return ds


def _config(batch=64, ga=1, clip=1.0):
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.train.batch_size, config.gradient_accumulation_steps, config.max_grad_norm = batch, ga, clip
    return config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ('WORLD_SIZE', 'ACCELERATE_USE_FSDP', 'ACCELERATE_USE_DEEPSPEED'):
        monkeypatch.delenv(name, raising=False)


def test_workers_that_each_think_they_are_alone_are_refused(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(LaunchError, match=r'started 2 processes \(WORLD_SIZE=2\) but accelerate runs 1 \(NO\).*'
                                          r'ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu'):
        check_launch(_acc(1))
    check_launch(_acc(2, DistributedType.MULTI_CPU))


@pytest.mark.parametrize('flag, kind', [('ACCELERATE_USE_FSDP', 'FSDP'), ('ACCELERATE_USE_DEEPSPEED', 'DEEPSPEED')])
def test_a_sharded_launch_turned_into_ddp_is_refused(monkeypatch, flag, kind):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv(flag, 'true')
    with pytest.raises(LaunchError, match=f'asks for {kind} .* but accelerate runs MULTI_CPU'):
        check_launch(_acc(2, DistributedType.MULTI_CPU))


def test_fp16_is_refused():
    with pytest.raises(LaunchError, match='fp16 is not supported'):
        check_launch(_acc(mixed='fp16'))
    with pytest.raises(LaunchError, match='fp16 is not supported'):
        check_launch(_acc(kind=DistributedType.DEEPSPEED, ds=_ds(fp16={'enabled': True}, bf16={'enabled': False})))


def test_deepspeed_batch_accumulation_and_clipping_come_from_the_config():
    ds = _ds()
    _configure_deepspeed(_acc(8, DistributedType.DEEPSPEED, ds=ds), _config(batch=240, ga=2, clip=0.5))
    assert ds['train_micro_batch_size_per_gpu'] == 30 and ds['train_batch_size'] == 480
    assert ds['gradient_accumulation_steps'] == 2 and ds['gradient_clipping'] == 0.5


@pytest.mark.parametrize('overrides, message', [
    (dict(gradient_clipping=1.0), 'gradient_clipping=1.0 but config.max_grad_norm=0.5'),
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps=1 but config.gradient_accumulation_steps gives 2"),
    (dict(train_micro_batch_size_per_gpu=4), "train_micro_batch_size_per_gpu=4 but config.train.batch_size=240 / 8"),
    (dict(zero_optimization={'stage': 3}), 'ZeRO stage 3 is not supported'),
    (dict(zero_optimization={'stage': 2, 'offload_optimizer': {'device': 'cpu'}}), 'offload_optimizer is not supported'),
    (dict(optimizer={'type': 'AdamW'}), "remove the 'optimizer' section"),
])
def test_deepspeed_settings_that_contradict_the_config_are_refused(overrides, message):
    with pytest.raises(LaunchError, match=message.replace('(', r'\(').replace(')', r'\)')):
        _configure_deepspeed(_acc(8, DistributedType.DEEPSPEED, ds=_ds(**overrides)), _config(240, 2, 0.5))


def test_sharding_kinds():
    assert sharding_kind(_acc(2, DistributedType.MULTI_GPU)) == 'replicated'
    assert sharding_kind(_acc(2, DistributedType.FSDP, fsdp_version=2)) == 'fsdp2'
    assert sharding_kind(_acc(2, DistributedType.DEEPSPEED, ds=_ds())) == 'zero2'


def test_deepspeed_bf16_runs_the_bf16_network_under_autocast():
    """DeepSpeed casts the weights to bf16 and leaves the forward alone; the fp32 input must still work."""
    config = _config()
    config.nnet.attention_head_dim, config.nnet.num_layers = 32, 3
    net = get_nnet(**config.nnet).bfloat16()
    context = forward_autocast(_acc(kind=DistributedType.DEEPSPEED, ds=_ds()))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    with context():
        out = net(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    with forward_autocast(_acc(kind=DistributedType.FSDP, mixed='bf16'))():           # FSDP2 needs it too
        assert torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
    with forward_autocast(_acc(kind=DistributedType.MULTI_GPU))():
        assert not torch.is_autocast_enabled('cpu')


@pytest.mark.parametrize('kind, version', [(DistributedType.FSDP, 1), (DistributedType.FSDP, 2),
                                           (DistributedType.DEEPSPEED, None)])
def test_compile_is_refused_under_sharded_launches(kind, version):
    config = _config()
    config.compile = 'default'
    with pytest.raises(LaunchError, match="config.compile='default' has not been tested under"):
        check_compile(config, _acc(2, kind, ds=_ds(), fsdp_version=version))
    config.compile = 'none'
    check_compile(config, _acc(2, kind, ds=_ds(), fsdp_version=version))
    config.compile = 'default'
    check_compile(config, _acc(2, DistributedType.MULTI_GPU))
