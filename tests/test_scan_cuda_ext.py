"""mamba-ssm / causal-conv1d through libs/scan/cuda_ext.py and the dispatcher, against stand-ins with the real
signatures and input rules (tests/kernel_standins.py), injected through sys.modules; the dispatcher's device-type
test is patched so that CPU tensors take the CUDA branch."""
import logging
import sys

import pytest
import torch

import kernel_standins as standins
import libs.scan as ss
from libs.model.mixer import MambaMixer
from libs.scan import cuda_ext
from reference_ops import max_rel_err, scan_inputs, sequential_scan


@pytest.fixture(autouse=True)
def _cuda_branch(monkeypatch):
    monkeypatch.delenv('DIM_SCAN_BACKEND', raising=False)
    monkeypatch.setattr(ss, '_device_type', lambda device: 'cuda')
    monkeypatch.setitem(sys.modules, 'libs.scan.triton_scan', None)     # no Triton: the mamba-ssm branch
    ss.reset()
    yield
    ss.reset()


def _conv_inputs(dtype=torch.float32, dim=8, L=13):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, dim, L, generator=g).to(dtype), torch.randn(dim, 3, generator=g),
            torch.randn(dim, generator=g))


def _conv_ref(x, w, b):
    xp = torch.nn.functional.pad(x.float(), (2, 0))
    out = torch.stack([b + sum(w[:, k] * xp[:, :, t + k] for k in range(3)) for t in range(x.shape[-1])], -1)
    return torch.nn.functional.silu(out)


def test_standins_reject_the_old_positional_calls(monkeypatch):
    """Positional calls are wrong against these signatures: 'silu' would land on seq_idx (causal-conv1d >= 1.2)."""
    x, w, b = _conv_inputs()
    with pytest.raises(AttributeError, match="'str' object has no attribute 'contiguous'"):
        standins.causal_conv1d_fn(x, w, b, 'silu')
    s = scan_inputs(1, 4, 3, 6)
    with pytest.raises(RuntimeError, match='delta.scalar_type'):        # u fp32 with delta bf16: the kernel refuses
        standins.selective_scan_fn(s['u'], s['delta'].bfloat16(), s['A'], s['B'], s['C'])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('layout', ['contiguous', 'channel_last', 'strided'])
def test_causal_conv1d_wrapper(dtype, layout):
    x, w, b = _conv_inputs(dtype)
    if layout == 'channel_last':
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == 'strided':
        x = torch.cat([x, x], dim=-1)[..., ::2]                          # stride(2) == 2: neither layout
    xr, wr, br = x.clone().float().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    out = cuda_ext.causal_conv1d(standins.causal_conv1d_fn, x, w, b, activation='silu')
    ref = _conv_ref(xr, wr, br)
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert max_rel_err(out.float(), ref) < tol
    gout = torch.randn(out.shape)
    grads = torch.autograd.grad((out.float() * gout).sum(), (x, w, b))
    grads_ref = torch.autograd.grad((ref * gout).sum(), (xr, wr, br))
    for a, r in zip(grads, grads_ref):
        assert max_rel_err(a.float(), r) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_selective_scan_wrapper_values_and_grads():
    x = {k: v.requires_grad_() for k, v in scan_inputs(2, 6, 4, 21).items()}
    x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    out = cuda_ext.selective_scan(standins.selective_scan_fn, **x, delta_softplus=True)
    ref, _ = sequential_scan(**x64, delta_softplus=True)
    assert max_rel_err(out.double(), ref) < 1e-5
    grads = torch.autograd.grad(out.sum(), list(x.values()))
    grads_ref = torch.autograd.grad(ref.sum(), list(x64.values()))
    for k, a, r in zip(x, grads, grads_ref):
        assert max_rel_err(a.double(), r) < 1e-5, k


def test_selective_scan_wrapper_meets_the_kernel_dtype_rules():
    """As autocast delivers them (u, z, B, C bf16; delta fp32 here; A, D, delta_bias fp32): one input dtype."""
    x = scan_inputs(1, 4, 3, 9)
    mixed = {k: (v.bfloat16() if k in ('u', 'z', 'B', 'C') else v) for k, v in x.items()}
    mixed['D'] = mixed['D'].double()
    out = cuda_ext.selective_scan(standins.selective_scan_fn, **mixed, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref, _ = sequential_scan(**{k: v.float() for k, v in mixed.items()}, delta_softplus=True)
    assert max_rel_err(out.float(), ref) < 2e-2
    out, last = cuda_ext.selective_scan(standins.selective_scan_fn, **x, return_last_state=True)
    assert last.dtype == torch.float32 and last.shape == (1, 4, 3)
    with pytest.raises(ValueError, match='drops the gradient of last_state'):
        cuda_ext.selective_scan(standins.selective_scan_fn, **{k: v.requires_grad_() for k, v in x.items()},
                                return_last_state=True)


def _mixer():
    torch.manual_seed(0)
    return MambaMixer(16, d_state=4)


@pytest.mark.parametrize('autocast', [False, True])
def test_mixer_runs_on_the_dao_kernels_when_forced(monkeypatch, caplog, autocast):
    standins.install(monkeypatch)
    mixer, u = _mixer(), torch.randn(2, 11, 16)
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'torch')
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        ref = mixer(u)
    ref.float().sum().backward()
    ref_grads = [p.grad.clone() for p in mixer.parameters()]
    mixer.zero_grad()
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'mamba_ssm')
    standins.calls.clear()
    with caplog.at_level(logging.INFO, logger='libs.scan'), \
            torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = mixer(u)
    out.float().sum().backward()
    assert ss.scan_backend('cpu') == 'mamba_ssm' and ss.conv_backend('cpu') == 'causal_conv1d'
    assert standins.calls.count('causal_conv1d_fn') >= 2 and standins.calls.count('selective_scan_fn') >= 2
    tol = 1e-5 if not autocast else 3e-2
    assert out.dtype == ref.dtype and max_rel_err(out.float(), ref.float()) < tol
    for a, r in zip([p.grad for p in mixer.parameters()], ref_grads):
        assert max_rel_err(a, r) < (1e-4 if not autocast else 5e-2)
    assert any("backend 'mamba_ssm' (forced" in r.getMessage() for r in caplog.records)


def test_auto_takes_a_working_mamba_ssm_and_the_conv_follows_the_scan(monkeypatch):
    standins.install(monkeypatch)
    assert ss.scan_backend('cpu') == 'mamba_ssm'                        # a working mamba-ssm kernel comes first
    assert ss.conv_backend('cpu') == 'causal_conv1d'
    ss.reset()
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'torch')
    assert ss.conv_backend('cpu') == 'torch'


def test_mamba_ssm_whose_kernel_is_not_built(monkeypatch, caplog):
    """Upstream after 2.3.2: the import succeeds, the first call raises. The probe sees it; no silent fallback."""
    standins.install(monkeypatch, scan=standins.failing_selective_scan_fn)
    with caplog.at_level(logging.INFO, logger='libs.scan'):
        assert ss.scan_backend('cpu') == 'torch'
    warning, = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 'mamba_ssm not usable: RuntimeError: selective_scan_cuda is not available' in warning.getMessage()
    assert 'estimate' in warning.getMessage() and 'Fix:' in warning.getMessage()
    ss.reset()
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'mamba_ssm')
    with pytest.raises(RuntimeError, match='DIM_SCAN_BACKEND=mamba_ssm cannot run.*MAMBA_KEEP_CUDA_BUILD=TRUE'):
        ss.scan_backend('cpu')


def test_mamba_ssm_not_installed_and_causal_conv1d_missing(monkeypatch, caplog):
    standins.install(monkeypatch, scan=None)
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'mamba_ssm')
    with pytest.raises(RuntimeError, match='ImportError'):
        ss.scan_backend('cpu')
    ss.reset()
    standins.install(monkeypatch, conv=None)
    with caplog.at_level(logging.INFO, logger='libs.scan'):
        assert ss.conv_backend('cpu') == 'torch'
    assert any('torch conv1d (causal-conv1d not usable: ImportError' in r.getMessage() for r in caplog.records)
    x, w, b = _conv_inputs()
    assert max_rel_err(ss.causal_conv1d(x, w, b, 'silu'), _conv_ref(x, w, b)) < 1e-6
