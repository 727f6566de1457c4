"""Bytes saved for backward, measured against the design figures computed from the shapes; the config defaults;
when config.recompute='auto' recomputes."""
import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftest import ROOT
from libs import get_nnet
from libs.config import load_config
from libs.model import memory_estimate
from libs.model.memory_estimate import (KEPT_EXTRA_PER_D, SavedBytes, block_bytes_per_sample, block_bytes_per_token,
                                        choose_recompute, config_memory_estimate, head_bytes_per_image_token,
                                        sequence_length)

TRAIN_CONFIGS = ['cifar10_S_DiM', 'digits_DiM_tiny', 'image_folder_DiM_S', 'imagenet256_H_DiM', 'imagenet256_L_DiM',
                 'imagenet512_H_DiM_ft']


def test_meter_counts_each_storage_once_and_no_parameters():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(5, 8, requires_grad=True)
    with SavedBytes(torch.nn.ParameterList([w])) as meter:
        y = x @ w                      # saves x and w
        (y * y).sum()                  # saves y twice: one storage
    assert meter.bytes == x.nbytes + y.nbytes


def _block_inputs(model, batch, L, layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = model.width
    u = torch.randn(batch, L, D, generator=g, requires_grad=True)
    mod = torch.randn(batch, 3, D, generator=g, requires_grad=True)
    skip = torch.randn(batch, L, D, generator=g) if layer in model.skip_consumers else None
    return u, mod, skip, torch.randperm(L, generator=g)


def _block_saved(model, layer, L, autocast, whole_block_checkpoint=False):
    block, saved = model.transformer_blocks[layer], []
    for batch in (1, 3):
        args = _block_inputs(model, batch, L, layer)
        with SavedBytes(block) as meter, torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            if whole_block_checkpoint:
                checkpoint(block, *args, recompute=False, use_reentrant=False)
            else:
                block(*args)
        saved.append(meter.bytes)
    return (saved[1] - saved[0]) / 2


@pytest.mark.parametrize('autocast, e', [(False, 4), (True, 2)])
@pytest.mark.parametrize('width', [64, 520])          # one Linear(2D, D) skip merge / two Linear(D, D)
@pytest.mark.parametrize('layer', [0, 4])             # a plain block / a long-skip consumer
def test_block_saves_what_the_design_says(width, layer, autocast, e):
    model = get_nnet('Mamba_DiT_H_2', attention_head_dim=width, num_layers=5, num_embeds_ada_norm=10,
                     sample_size=8).train()
    L = 31
    skip = layer in model.skip_consumers
    expected = L * block_bytes_per_token(width, 2, e, skip=skip) + block_bytes_per_sample(width)
    assert _block_saved(model, layer, L, autocast) == expected


def test_whole_block_checkpointing_keeps_only_the_block_inputs():
    model = get_nnet('Mamba_DiT_H_2', attention_head_dim=64, num_layers=5, num_embeds_ada_norm=10, sample_size=8)
    L, D = 31, 64
    assert _block_saved(model.train(), 0, L, True, whole_block_checkpoint=True) == L * 4 * D + 3 * D * 4
    assert _block_saved(model, 4, L, True, whole_block_checkpoint=True) == 2 * L * 4 * D + 3 * D * 4


@pytest.mark.parametrize('autocast, e', [(False, 4), (True, 2)])
def test_whole_model_scales_as_designed(autocast, e):
    D, layers, grid = 64, 5, 6
    model = get_nnet('Mamba_DiT_S_2', attention_head_dim=D, num_layers=layers, num_embeds_ada_norm=10,
                     sample_size=2 * grid).train()
    L = sequence_length(grid, grid)
    saved = []
    for batch in (1, 3):
        x, t, y = torch.randn(batch, 4, 2 * grid, 2 * grid), torch.rand(batch) * 1000, torch.zeros(batch).long()
        with SavedBytes(model) as meter, torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            model(x, t, y)
        saved.append(meter.bytes)
    per_sample = (saved[1] - saved[0]) / 2
    blocks = sum(L * block_bytes_per_token(D, 2, e, skip=l in model.skip_consumers) + block_bytes_per_sample(D)
                 for l in range(layers))
    head = grid * grid * head_bytes_per_image_token(D, e, 16)
    conditioning = e * 256 + 16 * 4 * D          # the time/class MLP inputs, a bound: per sample, not per token
    assert blocks + head <= per_sample <= blocks + head + conditioning


def test_estimate_reads_the_config_shapes():
    est = config_memory_estimate(load_config(str(ROOT / 'configs' / 'imagenet256_H_DiM.py')))
    assert (est['width'], est['depth'], est['tokens'], est['batch_per_gpu']) == (1536, 49, 366, 96)
    assert est['parameters'] == 862_407_184
    per_layer = (25 * block_bytes_per_token(1536) + 24 * block_bytes_per_token(1536, skip=True)) / 49
    assert est['bytes_per_token_per_layer'] == pytest.approx(per_layer, abs=1)
    assert est['activations'] > 96 * 366 * 49 * per_layer > est['activations_checkpointed']
    est512 = config_memory_estimate(load_config(str(ROOT / 'configs' / 'imagenet512_H_DiM_ft.py')))
    assert (est512['tokens'], est512['batch_per_gpu']) == (1230, 30)
    with pytest.raises(ValueError, match='smaller than gpus'):
        config_memory_estimate(load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py')), gpus=128)


@pytest.mark.parametrize('name', TRAIN_CONFIGS)
def test_checkpointing_is_on_exactly_where_the_batch_does_not_fit(name):
    config = load_config(str(ROOT / 'configs' / f'{name}.py'))
    est = config_memory_estimate(config, gpus=1 if name.startswith('digits') else 8)
    assert config.gradient_checkpointing == est['needs_checkpointing']
    assert est['fits_checkpointed']               # and with it, even unsharded state fits


def test_operand_bytes_are_checked():
    with pytest.raises(ValueError, match='operand_bytes'):
        block_bytes_per_token(64, operand_bytes=1)


@pytest.mark.parametrize('autocast, e', [(False, 4), (True, 2)])
def test_a_block_that_keeps_its_intermediates_saves_about_the_measured_extra(autocast, e):
    model = get_nnet('Mamba_DiT_H_2', attention_head_dim=256, num_layers=5, num_embeds_ada_norm=10,
                     sample_size=8).train()
    L = 31
    recomputing = _block_saved(model, 0, L, autocast)
    model.transformer_blocks[0].forward = functools.partial(type(model.transformer_blocks[0]).forward,
                                                            model.transformer_blocks[0], recompute=False)
    keeping = _block_saved(model, 0, L, autocast)
    extra_per_d = (keeping - recomputing) / (L * 256)
    assert extra_per_d == pytest.approx(KEPT_EXTRA_PER_D[e], rel=0.1)


def _digits_config(**changes):
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.update(changes)
    return config


def test_recompute_on_and_off_are_taken_as_they_are(monkeypatch):
    monkeypatch.setattr(memory_estimate, '_device_memory', lambda device: 0)     # nothing would fit
    assert choose_recompute(_digits_config(recompute='off'), 'cpu') is False
    assert choose_recompute(_digits_config(recompute='on'), 'cpu') is True
    with pytest.raises(ValueError, match="config.recompute='sometimes'"):
        choose_recompute(_digits_config(recompute='sometimes'), 'cpu')


def test_auto_keeps_the_intermediates_only_where_they_fit(monkeypatch, caplog):
    digits = _digits_config()
    est = config_memory_estimate(digits, 1, operand_bytes=4)
    need = est['activations_kept'] + est['state_replicated']
    assert est['activations_kept'] > est['activations']
    monkeypatch.setattr(memory_estimate, '_device_memory', lambda device: need * 1.01)
    with caplog.at_level('INFO', logger='libs.model.memory_estimate'):
        assert choose_recompute(digits, 'cpu') is False
    assert 'keep every intermediate' in caplog.text
    monkeypatch.setattr(memory_estimate, '_device_memory', lambda device: need * 0.99)
    assert choose_recompute(digits, 'cpu') is True
    h256 = load_config(str(ROOT / 'configs' / 'imagenet256_H_DiM.py'))             # an 80 GB card, 8 processes
    monkeypatch.setattr(memory_estimate, '_device_memory', lambda device: 0.9 * 80e9)
    assert choose_recompute(h256, 'cuda', processes=8, sharded=True, bf16=True) is True
