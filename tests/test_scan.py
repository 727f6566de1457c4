"""The public `selective_scan` (mamba-ssm semantics): backend dispatch, probes, logs, errors, trace safety."""
import logging
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

import kernel_standins as standins
import libs.scan as ss
from libs.scan import causal_conv1d, scan_backend, selective_scan
from libs.scan import cpu as scan_cpu
from reference_ops import max_rel_err, scan_inputs, sequential_scan

KEYS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
ROOT = pathlib.Path(__file__).resolve().parent.parent
HAVE_TRITON_SCAN = (ROOT / 'libs' / 'scan' / 'triton_scan.py').exists()
CPU_BACKENDS = ['torch', 'auto'] + (['cpu'] if scan_cpu.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv('DIM_SCAN_BACKEND', raising=False)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    ss.reset()
    yield
    ss.reset()


def _as_cuda(monkeypatch, hip=None):
    """Make CPU tensors look like CUDA ones to the dispatcher (its one device-type test)."""
    monkeypatch.setattr(ss, '_device_type', lambda device: 'cuda' if torch.device(device).type == 'cpu' else 'x')
    monkeypatch.setattr(torch.version, 'hip', hip)


def _standin_triton(monkeypatch, available=True):
    """A stand-in for libs/scan/triton_scan.py with its interface, computing with the sequential reference."""
    mod = types.ModuleType('libs.scan.triton_scan')
    mod.calls = []

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        mod.calls.append(dict(D=D is not None, z=z is not None, delta_softplus=delta_softplus))
        out, last = sequential_scan(u.float(), delta.float(), A, B.float(), C.float(), D,
                                    None if z is None else z.float(), delta_bias, delta_softplus)
        return (out.to(u.dtype), last) if return_last_state else out.to(u.dtype)

    mod.is_available = lambda: available
    mod.unavailable_reason = lambda: None if available else 'triton is not installed (stand-in)'
    mod.selective_scan = scan
    monkeypatch.setitem(sys.modules, 'libs.scan.triton_scan', mod)
    return mod


def _check_full_semantics(L, **kwargs):
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


@pytest.mark.parametrize('backend', CPU_BACKENDS)
@pytest.mark.parametrize('L', [1, 50, 367])
def test_full_semantics_match_sequential_scan(monkeypatch, backend, L):
    monkeypatch.setenv('DIM_SCAN_BACKEND', backend)
    _check_full_semantics(L)


def test_optional_arguments_are_optional(monkeypatch):
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'torch')
    x = scan_inputs(1, 4, 3, 20)
    out = selective_scan(x['u'], x['delta'].abs(), x['A'], x['B'], x['C'])
    ref, _ = sequential_scan(x['u'].double(), x['delta'].abs().double(), x['A'].double(),
                             x['B'].double(), x['C'].double())
    assert max_rel_err(out.double(), ref) < 1e-5


@pytest.mark.parametrize('backend', CPU_BACKENDS)
def test_low_precision_inputs_scan_in_fp32_and_return_their_dtype(monkeypatch, backend):
    monkeypatch.setenv('DIM_SCAN_BACKEND', backend)
    x = scan_inputs(1, 4, 3, 30)
    low = {k: (v.bfloat16() if k in ('u', 'delta', 'z', 'B', 'C') else v) for k, v in x.items()}
    out = selective_scan(**low, delta_softplus=True)
    ref, _ = sequential_scan(**{k: v.float().double() for k, v in low.items()}, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out.double(), ref) < 1e-2     # only the final rounding to bf16


def test_unknown_backend_names_are_rejected_with_the_valid_ones(monkeypatch):
    for bad, extra in (('cuda', 'auto, mamba_ssm, triton, cpu, torch'), ('fast', 'auto, mamba_ssm, triton, cpu, torch')):
        monkeypatch.setenv('DIM_SCAN_BACKEND', bad)
        with pytest.raises(ValueError, match=extra):
            scan_backend('cpu')


def test_auto_on_cpu_takes_the_c_kernel_when_built(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger='libs.scan')
    expected = 'cpu' if scan_cpu.is_available() else 'torch'
    assert scan_backend('cpu') == expected
    monkeypatch.setenv('TRITON_INTERPRET', '1')          # the interpreter is for tests, never picked by auto
    ss.reset()
    assert scan_backend('cpu') == expected


def test_auto_on_cpu_without_the_c_kernel_warns(monkeypatch, caplog):
    monkeypatch.setattr(scan_cpu, 'is_available', lambda: False)
    monkeypatch.setattr(scan_cpu, 'unavailable_reason', lambda: 'not built (test)')
    with caplog.at_level(logging.INFO, logger='libs.scan'):
        assert scan_backend('cpu') == 'torch'
    warning, = [r for r in caplog.records if r.levelno == logging.WARNING]
    msg = warning.getMessage()
    assert "'torch'" in msg and 'estimate' in msg and 'not built (test)' in msg and 'pip install -e .' in msg


def test_forced_backends_that_cannot_run_are_errors_with_the_fix(monkeypatch):
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'mamba_ssm')
    with pytest.raises(RuntimeError, match='CUDA tensors.*MAMBA_KEEP_CUDA_BUILD'):
        scan_backend('cpu')
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'triton')
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        scan_backend('cpu')
    monkeypatch.setattr(scan_cpu, 'is_available', lambda: False)
    monkeypatch.setattr(scan_cpu, 'unavailable_reason', lambda: 'not built (test)')
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'cpu')
    with pytest.raises(RuntimeError, match=r'not built \(test\).*pip install -e \.'):
        scan_backend('cpu')
    _as_cuda(monkeypatch)
    with pytest.raises(RuntimeError, match='CPU tensors, not cuda'):
        scan_backend('cpu')


def test_the_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'torch')
    x = scan_inputs(1, 4, 3, 10)
    with caplog.at_level(logging.INFO, logger='libs.scan'):
        for _ in range(3):
            selective_scan(**x)
    assert len([r for r in caplog.records if 'selective scan on cpu' in r.getMessage()]) == 1


def test_auto_on_cuda_prefers_a_working_mamba_ssm_kernel(monkeypatch, caplog):
    _as_cuda(monkeypatch)
    standins.install(monkeypatch)                       # mamba-ssm and causal-conv1d with their real signatures
    triton = _standin_triton(monkeypatch)
    with caplog.at_level(logging.INFO, logger='libs.scan'):
        assert scan_backend('cpu') == 'mamba_ssm'
    assert any("backend 'mamba_ssm' (auto)" in r.getMessage() for r in caplog.records)
    assert triton.calls == []                           # the Triton scan is not even probed
    x = scan_inputs(2, 8, 16, 33)
    ref, _ = sequential_scan(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    assert max_rel_err(selective_scan(**x, delta_softplus=True).double(), ref) < 1e-5
    assert standins.calls[-1] == 'selective_scan_fn'


@pytest.mark.parametrize('mamba', ['not installed', 'kernel not built'])
def test_auto_on_cuda_takes_triton_when_mamba_ssm_does_not_run_and_calls_it_by_keyword(monkeypatch, caplog, mamba):
    _as_cuda(monkeypatch)
    standins.install(monkeypatch, scan=None if mamba == 'not installed' else standins.failing_selective_scan_fn)
    triton = _standin_triton(monkeypatch)
    with caplog.at_level(logging.INFO, logger='libs.scan'):
        assert scan_backend('cpu') == 'triton'
    chosen, = [r.getMessage() for r in caplog.records if "backend 'triton' (auto" in r.getMessage()]
    assert 'mamba_ssm not usable' in chosen
    n_probe = len(triton.calls)
    _check_full_semantics(33)
    assert len(triton.calls) == n_probe + 1 and triton.calls[-1] == dict(D=True, z=True, delta_softplus=True)


def test_rocm_takes_the_same_path_and_says_so(monkeypatch, caplog):
    _as_cuda(monkeypatch, hip='6.3.0')
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)                 # not installed (no ROCm build of it)
    _standin_triton(monkeypatch)
    with caplog.at_level(logging.INFO, logger='libs.scan'):
        assert scan_backend('cpu') == 'triton'
    assert any('ROCm 6.3.0' in r.getMessage() for r in caplog.records)


def test_cuda_without_a_fused_kernel_lands_on_torch_with_a_warning(monkeypatch, caplog):
    _as_cuda(monkeypatch)
    _standin_triton(monkeypatch, available=False)
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)                 # not installed
    with caplog.at_level(logging.INFO, logger='libs.scan'):
        assert scan_backend('cpu') == 'torch'
    warning, = [r for r in caplog.records if r.levelno == logging.WARNING]
    msg = warning.getMessage()
    assert "backend 'torch'" in msg and '25x the memory traffic' in msg and 'estimate' in msg
    assert 'triton not usable: triton is not installed (stand-in)' in msg and 'mamba_ssm not usable' in msg
    assert 'Fix:' in msg and 'MAMBA_KEEP_CUDA_BUILD' in msg and 'ships Triton' in msg


def test_a_kernel_that_gives_wrong_results_is_not_used(monkeypatch):
    _as_cuda(monkeypatch)
    triton = _standin_triton(monkeypatch)
    good = triton.selective_scan
    triton.selective_scan = lambda *a, **k: good(*a, **k) * 1.01
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)
    assert scan_backend('cpu') == 'torch'
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'triton')
    with pytest.raises(RuntimeError, match='disagree with the torch backend'):
        scan_backend('cpu')


def test_the_choice_is_traced_once_and_never_breaks_the_graph(monkeypatch):
    x = scan_inputs(2, 8, 4, 40)
    ref = selective_scan(**x, delta_softplus=True)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda: selective_scan(**x, delta_softplus=True))()
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(lambda **kw: selective_scan(**kw, delta_softplus=True), fullgraph=True,
                             backend='aot_eager')
    assert max_rel_err(compiled(**x), ref) < 1e-6
    torch._dynamo.reset()


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


def test_rejects_unsupported_shapes():
    x = scan_inputs(1, 4, 3, 5)
    with pytest.raises(ValueError, match='A must be'):
        selective_scan(x['u'], x['delta'], x['A'][None], x['B'], x['C'])
    with pytest.raises(ValueError, match='B and C'):
        selective_scan(x['u'], x['delta'], x['A'], x['B'][0], x['C'])


@pytest.mark.skipif(not HAVE_TRITON_SCAN, reason='libs/scan/triton_scan.py not written yet')
def test_triton_backend_is_wired_to_the_real_kernel_under_the_interpreter():
    """DIM_SCAN_BACKEND=triton with TRITON_INTERPRET=1 (a fresh process: Triton reads it at import) runs the real
    libs/scan/triton_scan.py through the dispatcher and its probe; values and gradients vs the sequential scan."""
    code = """
import sys; sys.path[:0] = ['.', 'tests']
import torch
from libs.scan import scan_backend, selective_scan
from reference_ops import max_rel_err, scan_inputs, sequential_scan
assert scan_backend('cpu') == 'triton'
x = {k: v.requires_grad_() for k, v in scan_inputs(2, 5, 4, 19).items()}
x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
out = selective_scan(**x, delta_softplus=True)
ref, _ = sequential_scan(**x64, delta_softplus=True)
g = torch.autograd.grad(out.sum(), list(x.values()))
g64 = torch.autograd.grad(ref.sum(), list(x64.values()))
errs = [max_rel_err(out.double(), ref)] + [max_rel_err(a.double(), b) for a, b in zip(g, g64)]
assert max(errs) < 1e-5, errs
print('ok', max(errs))
"""
    env = dict(os.environ, DIM_SCAN_BACKEND='triton', TRITON_INTERPRET='1')
    run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and 'ok' in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize('autocast', [False, True])
def test_compiled_causal_conv1d_equals_eager(autocast):
    """Traced, the conv becomes a windowed sum for Inductor to fuse: same values, gradients and dtype."""
    g = torch.Generator().manual_seed(1)
    xz = torch.randn(2, 13, 12, generator=g)
    w, b = torch.randn(6, 3, generator=g).requires_grad_(), torch.randn(6, generator=g).requires_grad_()

    def conv(xz):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            return causal_conv1d(xz.transpose(1, 2)[:, :6], w, b, 'silu')

    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True, backend='aot_eager')
    outs = []
    for fn in (conv, compiled):
        x = xz.clone().requires_grad_()
        out = fn(x)
        outs.append([out] + list(torch.autograd.grad(out.float().square().sum(), (x, w, b))))
    torch._dynamo.reset()
    assert outs[0][0].dtype == outs[1][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    for a, r in zip(outs[1], outs[0]):
        assert max_rel_err(a.float(), r.float()) < (1e-6 if not autocast else 2e-2)
