"""The public `selective_scan` (mamba_ssm semantics) and its backend selection."""
import pytest
import torch

import libs.scan as ss
from libs.scan import causal_conv1d, scan_backend, selective_scan
from reference_ops import max_rel_err, scan_inputs, sequential_scan

KEYS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


@pytest.mark.parametrize('backend', ['torch', 'auto'])
@pytest.mark.parametrize('L', [1, 50, 367])
def test_full_semantics_match_sequential_scan(monkeypatch, backend, L):
    monkeypatch.setenv('DIM_SCAN_BACKEND', backend)
    x = {k: v.requires_grad_() for k, v in scan_inputs(2, 8, 16, L).items()}
    x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    ref, last_ref = sequential_scan(**x64, delta_softplus=True)
    assert out.dtype == torch.float32 and out.shape == (2, 8, L) and last.shape == (2, 8, 16)
    assert max_rel_err(out.double(), ref) < 1e-5 and max_rel_err(last.double(), last_ref) < 1e-5
    gout = torch.randn_like(out)
    grads = torch.autograd.grad((out * gout).sum(), [x[k] for k in KEYS])
    grads_ref = torch.autograd.grad((ref * gout.double()).sum(), [x64[k] for k in KEYS])
    for k, a, b in zip(KEYS, grads, grads_ref):
        assert max_rel_err(a.double(), b) < 1e-5, k


def test_optional_arguments_are_optional(monkeypatch):
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'torch')
    x = scan_inputs(1, 4, 3, 20)
    out = selective_scan(x['u'], x['delta'].abs(), x['A'], x['B'], x['C'])
    ref, _ = sequential_scan(x['u'].double(), x['delta'].abs().double(), x['A'].double(),
                             x['B'].double(), x['C'].double())
    assert max_rel_err(out.double(), ref) < 1e-5


def test_low_precision_inputs_scan_in_fp32_and_return_their_dtype(monkeypatch):
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'torch')
    x = scan_inputs(1, 4, 3, 30)
    low = {k: (v.bfloat16() if k in ('u', 'delta', 'z', 'B', 'C') else v) for k, v in x.items()}
    out = selective_scan(**low, delta_softplus=True)
    ref, _ = sequential_scan(**{k: v.float().double() for k, v in low.items()}, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out.double(), ref) < 1e-2     # only the final rounding to bf16


def test_backend_selection_and_errors(monkeypatch):
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'torch')
    assert scan_backend('cpu') == 'torch'
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'auto')
    expected = 'cpu' if ss._cpu_kernel() is not None else 'torch'
    assert scan_backend('cpu') == expected
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'cuda')
    with pytest.raises(RuntimeError, match='DIM_SCAN_BACKEND=cuda'):
        scan_backend('cpu')
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'triton')
    with pytest.raises(ValueError, match="'triton'"):
        scan_backend('cpu')


def test_rejects_unsupported_shapes():
    x = scan_inputs(1, 4, 3, 5)
    with pytest.raises(ValueError, match='A must be'):
        selective_scan(x['u'], x['delta'], x['A'][None], x['B'], x['C'])
    with pytest.raises(ValueError, match='B and C'):
        selective_scan(x['u'], x['delta'], x['A'], x['B'][0], x['C'])


@pytest.mark.parametrize('activation', [None, 'silu'])
def test_causal_conv1d_matches_definition(activation):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 11, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    out = causal_conv1d(x, w, b, activation)
    xp = torch.nn.functional.pad(x, (2, 0))
    ref = torch.stack([b + sum(w[:, k] * xp[:, :, t + k] for k in range(3)) for t in range(11)], dim=-1)
    if activation == 'silu':
        ref = torch.nn.functional.silu(ref)
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match='gelu'):
        causal_conv1d(x, w, b, 'gelu')
