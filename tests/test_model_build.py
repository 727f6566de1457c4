"""get_nnet: official state_dict layout for every official config, and validation of config.nnet."""
import os

import pytest
import torch

from conftest import MANIFESTS, ROOT, load_manifest
from libs import get_nnet
from libs.config import load_config

CONFIGS = {p.stem.replace('manifest_', ''): p for p in MANIFESTS}


def _meta_nnet(nnet_kwargs):
    kwargs = dict(nnet_kwargs)
    kwargs.pop('pretrained_path', None)
    with torch.device('meta'):
        return get_nnet(**kwargs)


def _layout(model):
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_our_config_has_the_official_state_dict(name):
    manifest = load_manifest(CONFIGS[name])
    config = load_config(str(ROOT / 'configs' / f'{name}.py'))
    model = _meta_nnet(config.nnet.to_dict())
    assert _layout(model) == [(k, s) for k, s, _ in manifest['state_dict']]   # keys, shapes and order
    assert sum(p.numel() for p in model.parameters()) == manifest['total_parameter_count']
    assert all(not b for b in model.buffers())                               # no persistent buffers
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_official_nnet_dict_is_accepted_unchanged(name):
    manifest = load_manifest(CONFIGS[name])
    model = _meta_nnet(manifest['nnet_config'])
    assert _layout(model) == [(k, s) for k, s, _ in manifest['state_dict']]


def test_parameter_counts_of_the_families():
    counts = {}
    for name, cfg in [('S', 'cifar10_S_DiM'), ('L', 'imagenet256_L_DiM'), ('H', 'imagenet256_H_DiM')]:
        config = load_config(str(ROOT / 'configs' / f'{cfg}.py'))
        counts[name] = sum(p.numel() for p in _meta_nnet(config.nnet.to_dict()).parameters())
    assert counts == {'S': 50_568_716, 'L': 386_063_376, 'H': 862_407_184}


def test_name_picks_the_family_and_kwargs_set_the_size():
    model = _meta_nnet(dict(name='Mamba_DiT_H_2', attention_head_dim=528, num_layers=3))
    assert model.width == 528 and model.depth == 3
    assert model.transformer_blocks[2].skip_linear[0].weight.shape == (528, 528)  # D > 512: two linears
    small = _meta_nnet(dict(name='Mamba_DiT_S_2', attention_head_dim=64, num_layers=5))
    assert small.transformer_blocks[4].skip_linear.weight.shape == (64, 128)       # D <= 512: one Linear(2D, D)


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='Mamba_DiT_XL_2'), "unknown network name 'Mamba_DiT_XL_2'"),
    (dict(name='Mamba_DiT_S_2', hidden_size=64), r"unknown config.nnet key\(s\).*hidden_size"),
    (dict(name='Mamba_DiT_S_2', mamba_type='attn'), "mamba_type='attn' is not supported"),
    (dict(name='Mamba_DiT_S_2', is_freeu=True), 'is_freeu=True is not supported'),
    (dict(name='Mamba_DiT_S_2', is_absorb=True), 'is_absorb=True'),
    (dict(name='Mamba_DiT_S_2', pad_token_schedules=['dec_split', 'embedin_lateral']), 'pad_token_schedules'),
    (dict(name='Mamba_DiT_S_2', num_layers=24), 'num_layers must be odd'),
    (dict(name='Mamba_DiT_S_2', encoder_start_blk_id=2), 'encoder_start_blk_id=2'),
    (dict(name='Mamba_DiT_S_2', out_channels=6, in_channels=3), 'out_channels=6'),
    (dict(name='Mamba_DiT_S_2', num_patches=[1000]), 'num_patches entry=1000'),
    (dict(name='Mamba_DiT_S_2', sample_size=33), 'sample_size=33'),
    (dict(name='Mamba_DiT_S_2', is_skip_tune=True, skip_tune_schedule='cosine'), "'cosine'"),
    (dict(name='Mamba_DiT_S_2', num_layers=3, is_skip_tune=True), 'at least two long-skip layers'),
])
def test_bad_options_are_errors_that_name_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _meta_nnet(kwargs)


def test_dead_official_keys_are_accepted_with_any_value():
    model = _meta_nnet(dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=3,
                            activation_fn='geglu', use_conv1d=False, sequence_schedule='anything'))
    assert model.width == 32


def test_missing_pretrained_file_is_named(tmp_path):
    path = str(tmp_path / 'nope' / 'nnet_ema.pth')
    with pytest.raises(FileNotFoundError, match=path):
        get_nnet('Mamba_DiT_S_2', attention_head_dim=32, num_layers=3, pretrained_path=path)


def test_configs_have_no_import_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in sorted((ROOT / 'configs').glob('*.py')):
        load_config(str(path))
    assert os.listdir(tmp_path) == []
