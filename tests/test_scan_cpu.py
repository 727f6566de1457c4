"""The compiled CPU scan kernel (libs/scan/cpu.py, libs/scan/csrc/): values and gradients against a float64 sequential
scan, exp edge cases, thread-count independence, each for every ISA variant this CPU runs. Skipped when the kernel was
not built."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import libs.scan as ss
from libs.scan import cpu as scan_cpu
from reference_ops import max_rel_err, scan_inputs, sequential_scan

pytestmark = pytest.mark.skipif(not scan_cpu.is_available(),
                                reason=f"compiled CPU scan kernel not built: {scan_cpu.unavailable_reason()}")

TOL = 1e-5  # max |err| / max |reference|, per tensor, fp32 kernel vs float64 sequential scan
ALL_ISAS = ('avx512', 'avx2', 'generic')


@contextlib.contextmanager
def forced_isa(name):
    """The kernel's `name` variant for the duration (the best supported one if the CPU lacks it)."""
    try:
        yield scan_cpu.isa(name)
    finally:
        scan_cpu.isa('auto')


def runnable_isas():
    """The variants this CPU runs (forcing one it lacks selects another)."""
    if not scan_cpu.is_available():
        return []
    found = []
    for name in ALL_ISAS:
        with forced_isa(name) as got:
            if got == name:
                found.append(name)
    return found


ISAS = runnable_isas()


def ref_scan(delta, u, A, B, C):
    """Plain sequential scan (the recurrence of mamba_ssm's selective_scan_ref), differentiable by autograd.
    Time-major unbind keeps its backward O(L)."""
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])               # (b, d, l, n)
    dBu = (delta * u).unsqueeze(-1) * B.transpose(1, 2)[:, None]       # (b, d, l, n)
    Cs = C.unbind(-1)
    h = delta.new_zeros(delta.shape[0], delta.shape[1], A.shape[1])
    ys = []
    for t, (a, x) in enumerate(zip(dA.unbind(2), dBu.unbind(2))):
        h = a * h + x
        ys.append(torch.einsum('bdn,bn->bd', h, Cs[t]))
    return torch.stack(ys, dim=-1), h


def make_inputs(bsz, d, length, n, dt_scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dt_scale == 'normal':
        # Mamba's dt init: dt ~ logUniform(1e-3, 1e-1), stored as softplus^-1(dt); plus a data-dependent term
        dt0 = torch.exp(torch.rand(d, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                        + torch.log(torch.tensor(1e-3)))
        bias = dt0 + torch.log(-torch.expm1(-dt0))
        delta = F.softplus(bias[:, None] + 0.5 * torch.randn(bsz, d, length, generator=g))
    else:  # large: dt about 2-3
        delta = 2.0 + torch.rand(bsz, d, length, generator=g)
    A = -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1)
                   + 0.1 * torch.randn(d, n, generator=g))                      # S4D-real init, perturbed
    u = torch.randn(bsz, d, length, generator=g)
    B = torch.randn(bsz, n, length, generator=g)
    C = torch.randn(bsz, n, length, generator=g)
    return delta, u, A, B, C


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _loss_weights(inputs, seed):
    g = torch.Generator().manual_seed(seed)
    bsz, d, length = inputs[0].shape
    n = inputs[2].shape[1]
    return torch.randn(bsz, d, length, generator=g), torch.randn(bsz, d, n, generator=g)


def run_kernel(inputs, segment=None, seed=1):
    """Kernel outputs, last state and gradients of a loss that uses both y and last_state."""
    gy, gl = _loss_weights(inputs, seed)
    x32 = [t.clone().requires_grad_() for t in inputs]
    y, last = scan_cpu.scan_core(*x32, return_last_state=True, segment=segment)
    ((y * gy).sum() + (last * gl).sum()).backward()
    return y, last, [t.grad for t in x32]


def run_ref(inputs, seed=1):
    """The same in float64 with the sequential reference."""
    gy, gl = _loss_weights(inputs, seed)
    x64 = [t.double().requires_grad_() for t in inputs]
    y64, last64 = ref_scan(*x64)
    ((y64 * gy.double()).sum() + (last64 * gl.double()).sum()).backward()
    return y64, last64, [t.grad for t in x64]


def run_both(inputs, segment=None, seed=1):
    return run_kernel(inputs, segment, seed), run_ref(inputs, seed)


def assert_close_to_ref(ours, ref, tol=TOL, what=''):
    (y, last, grads), (y64, last64, grads64) = ours, ref
    errs = {'y': rel_err(y.detach(), y64), 'last_state': rel_err(last.detach(), last64)}
    for name, g, g64 in zip(('delta', 'u', 'A', 'B', 'C'), grads, grads64):
        assert g is not None and g.shape == g64.shape and g.dtype == torch.float32, name
        errs['grad_' + name] = rel_err(g, g64)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad} (all: {errs})"
    return errs


@pytest.mark.parametrize('length', [1, 2, 7, 65, 1000])
@pytest.mark.parametrize('bsz,d,n', [(2, 20, 16), (1, 33, 5), (3, 16, 40)])
@pytest.mark.parametrize('dt_scale', ['normal', 'large'])
def test_values_and_grads_vs_float64(length, bsz, d, n, dt_scale):
    inputs = make_inputs(bsz, d, length, n, dt_scale, seed=length + d)
    ref = run_ref(inputs)
    for isa in ISAS:
        with forced_isa(isa):
            # default segment (64) and one that never aligns with L or the 16-step tiles
            for segment in (None, 7):
                assert_close_to_ref(run_kernel(inputs, segment=segment), ref, what=isa)


@pytest.mark.parametrize('dt_scale', ['normal', 'large'])
def test_long_sequence(dt_scale):
    inputs = make_inputs(1, 6, 9123, 16, dt_scale, seed=3)
    ref = run_ref(inputs)
    for isa in ISAS:
        with forced_isa(isa):
            ours = run_kernel(inputs)
        for t in [ours[0], ours[1]] + ours[2]:
            assert torch.isfinite(t).all(), isa
        assert_close_to_ref(ours, ref, what=isa)


def test_isa_forcing():
    """The baseline variant always runs; 'auto' is the best one; a variant the CPU lacks gives a supported one."""
    assert 'generic' in ISAS
    best = scan_cpu.isa('auto')
    assert best == ISAS[0]
    for name in ALL_ISAS:
        with forced_isa(name) as got:
            assert got == (name if name in ISAS else best)
    assert scan_cpu.isa() == best
    with pytest.raises(ValueError, match='avx2'):
        scan_cpu.isa('sse4')


@pytest.mark.parametrize('dt_scale', ['normal', 'large'])
@pytest.mark.parametrize('L', [1, 50, 367])
def test_full_semantics_for_every_isa(monkeypatch, L, dt_scale):
    """selective_scan on the cpu backend (delta_bias, softplus, D, z) with the inputs of the dispatcher's tests."""
    monkeypatch.setenv('DIM_SCAN_BACKEND', 'cpu')
    ss.reset()
    keys = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
    x = scan_inputs(2, 8, 16, L, dt_scale=dt_scale)
    x64 = {k: v.double().requires_grad_() for k, v in x.items()}
    ref, last_ref = sequential_scan(**x64, delta_softplus=True)
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(L))
    grads_ref = torch.autograd.grad((ref * gout.double()).sum(), [x64[k] for k in keys])
    try:
        for isa in ISAS:
            xs = {k: v.clone().requires_grad_() for k, v in x.items()}
            with forced_isa(isa):
                out, last = ss.selective_scan(**xs, delta_softplus=True, return_last_state=True)
                grads = torch.autograd.grad((out * gout).sum(), [xs[k] for k in keys])
            assert max_rel_err(out.double(), ref) < TOL and max_rel_err(last.double(), last_ref) < TOL, isa
            for k, a, b in zip(keys, grads, grads_ref):
                assert max_rel_err(a.double(), b) < TOL, (isa, k)
    finally:
        ss.reset()


def test_segments_with_extreme_exponents_take_the_general_exp_path():
    """A segment whose dt*A may leave fp32's normal range is computed with the general exp (the others with the shorter
    one): one channel given a huge dt in one step changes no other channel's results beyond rounding, and the scan
    still matches the float64 reference (exp(dt*A) underflowing to 0 there)."""
    delta, u, A, B, C = make_inputs(2, 20, 150, 16, 'normal', seed=21)
    extreme = delta.clone()
    extreme[0, 3, 70] = 1e4
    ref = run_ref([extreme, u, A, B, C])
    for isa in ISAS:
        with forced_isa(isa):
            y_plain, _ = scan_cpu.scan_core(delta, u, A, B, C)
            ours = run_kernel([extreme, u, A, B, C])
        others = torch.ones(2, 20, dtype=torch.bool)
        others[0, 3] = False
        assert rel_err(ours[0].detach()[others], y_plain[others]) <= 1e-6, isa
        assert_close_to_ref(ours, ref, what=isa)


@pytest.mark.parametrize('isa', ISAS)
def test_threads_bit_identical(isa):
    """Same bits for any thread count, on torch's OpenMP threads or on our pthreads."""
    inputs = make_inputs(2, 70, 777, 16, 'normal', seed=7)
    before = torch.get_num_threads()
    results = []
    try:
        scan_cpu.isa(isa)
        for backend in ('pthreads', 'openmp'):
            scan_cpu.threading_backend(backend)
            for nt in (1, 2, 3):
                torch.set_num_threads(nt)
                xs = [t.clone().requires_grad_() for t in inputs]
                y, last = scan_cpu.scan_core(*xs, return_last_state=True)
                (y.sin().sum() + last.sum()).backward()
                results.append([y.detach(), last.detach()] + [t.grad for t in xs])
    finally:
        torch.set_num_threads(before)
        scan_cpu.threading_backend('pthreads')
        scan_cpu.isa('auto')
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize('isa', ISAS)
def test_no_grad_path_and_partial_requires_grad(isa):
    with forced_isa(isa):
        _check_no_grad_path_and_partial_requires_grad()


def _check_no_grad_path_and_partial_requires_grad():
    delta, u, A, B, C = make_inputs(2, 24, 100, 16, 'normal', seed=9)
    with torch.no_grad():
        y0, last0 = scan_cpu.scan_core(delta, u, A, B, C, return_last_state=True)
    y1, none = scan_cpu.scan_core(delta, u, A, B, C)
    assert none is None and not y1.requires_grad
    assert torch.equal(y0, y1)
    Ar = A.clone().requires_grad_()
    y2, last2 = scan_cpu.scan_core(delta, u, Ar, B, C, return_last_state=True)
    assert torch.equal(y0, y2.detach()) and torch.equal(last0, last2.detach())
    y2.sum().backward()
    assert Ar.grad is not None and torch.isfinite(Ar.grad).all()
    # only last_state used in the loss
    xs = [t.clone().requires_grad_() for t in (delta, u, A, B, C)]
    _, last3 = scan_cpu.scan_core(*xs, return_last_state=True)
    last3.pow(2).sum().backward()
    x64 = [t.double().requires_grad_() for t in (delta, u, A, B, C)]
    ref_scan(*x64)[1].pow(2).sum().backward()
    for a, b in zip(xs, x64):
        if b.grad is None:                              # C does not reach the last state
            assert not a.grad.any()
        else:
            assert rel_err(a.grad, b.grad) <= TOL


@pytest.mark.parametrize('isa', ISAS)
def test_non_contiguous_inputs(isa):
    delta, u, A, B, C = make_inputs(2, 24, 50, 16, 'large', seed=11)
    # same values, transposed storage
    nc = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (delta, u, A, B, C)]
    assert not nc[0].is_contiguous()
    with forced_isa(isa):
        y_a, _ = scan_cpu.scan_core(delta, u, A, B, C)
        y_b, _ = scan_cpu.scan_core(*nc)
    assert torch.equal(y_a, y_b)


def test_gradcheck_float64_reference_agrees():
    """Sanity check of the test's own reference against torch.autograd.gradcheck (tiny shape)."""
    inputs = [t.double().requires_grad_() for t in make_inputs(1, 3, 5, 2, 'normal', seed=13)]
    assert torch.autograd.gradcheck(lambda *x: ref_scan(*x)[0], inputs)


def exp_edge_inputs():
    x = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -1e-3, -0.34, -0.35, -0.5, -1.0, -10.0, -50.0, -87.0, -87.5, -95.0,
                      -103.0, -103.9, -104.0, -120.0, -1e4, -1e30, 1e-3, 1.0, 10.0, 50.0, 88.0, 88.7, 88.8, 100.0,
                      1e30, float('-inf'), float('inf'), float('nan')])
    return torch.cat([x, torch.linspace(-110, 90, 20011)])


def assert_exp_like_expf(x, got, what):
    """got = the kernel's exp(x): about 2 ulp where exp(x) is a normal float, correctly rounded denormals, 0 below,
    +inf above, NaN for NaN."""
    want, got = torch.exp(x.double()), got.double()
    fin = torch.isfinite(want) & (want > 2.0 ** -126) & (want < 3.4e38)
    # about 2 ulp (2^-23 relative), plus the rounding of x*log2(e): up to |x| * 2^-24
    bound = (5 * 2.0 ** -24 + 1.5 * x.double().abs() * 2.0 ** -24).nan_to_num(1.0).clamp(max=1.0)
    err = (got[fin] - want[fin]).abs() / want[fin]
    assert (err <= bound[fin]).all(), (what, err.max().item())
    tiny = want <= 2.0 ** -126                                 # denormal range or zero: absolute error
    assert ((got[tiny] - want[tiny]).abs() <= bound[tiny] * want[tiny] + 2.0 ** -149).all(), what
    big = want >= 3.41e38
    assert (torch.isinf(got[big]) & (got[big] > 0)).all(), what
    assert torch.isnan(got[torch.isnan(want)]).all(), what
    assert got[x == float('-inf')].item() == 0.0, what


def test_exp_edge_cases():
    """The kernel evaluates exp(dt*A) as 2^(dt * A*log2 e) with a vector polynomial: it must behave like expf on any
    input (0 / correctly rounded denormals below, +inf above, NaN stays NaN), in every ISA variant, through both of
    its paths (the shorter one where a whole vector of arguments keeps 2^x normal)."""
    x = exp_edge_inputs()
    for isa in ISAS:
        with forced_isa(isa):
            assert_exp_like_expf(x, scan_cpu.kernel_exp(x), isa)


@pytest.mark.parametrize('isa', ISAS)
def test_scan_overflow_like_the_loop(isa):
    """Growing states (A > 0) overflow to inf/nan at the same step as in the fp32 sequential loop (within one step:
    rounding right at FLT_MAX may differ), and agree before that."""
    delta, u, A, B, C = make_inputs(1, 16, 80, 16, 'large', seed=17)
    A = A.abs() * 0.1                                   # exp(dt*A) up to ~e^5 per step: overflow after 20-80 steps
    with forced_isa(isa):
        y, _ = scan_cpu.scan_core(delta, u, A, B, C)
    y_ref, _ = ref_scan(delta, u, A, B, C)              # the same recurrence in fp32

    def first_bad(v):                                   # first non-finite step per channel (L if none)
        bad = ~torch.isfinite(v)
        return torch.where(bad.any(-1), bad.float().argmax(-1), torch.full(bad.shape[:-1], v.shape[-1]))

    fb, fb_ref = first_bad(y), first_bad(y_ref)
    assert (fb_ref < y.shape[-1]).any() and (fb_ref > 0).all()      # the test does overflow, not at once
    assert ((fb - fb_ref).abs() <= 1).all()
    steps = torch.arange(y.shape[-1])
    ok = steps < (torch.minimum(fb, fb_ref) - 1).unsqueeze(-1)
    assert rel_err(y[ok], y_ref[ok]) <= 1e-4


def test_input_validation():
    delta, u, A, B, C = make_inputs(1, 4, 8, 16, 'normal')
    with pytest.raises(TypeError):
        scan_cpu.scan_core(delta.double(), u, A, B, C)
    with pytest.raises(ValueError):
        scan_cpu.scan_core(delta, u, A[:3], B, C)
    with pytest.raises(ValueError):
        scan_cpu.scan_core(delta, u, A, B[:, :, :5], C)


def test_is_available_never_raises_without_library():
    code = ("import os, sys; sys.path.insert(0, os.getcwd()); from libs.scan import cpu as scan_cpu; "
            "assert scan_cpu.is_available() is False; assert 'not' in scan_cpu.unavailable_reason() or "
            "'disabled' in scan_cpu.unavailable_reason(); print('ok')")
    env = dict(os.environ, DIM_SCAN_CPU_LIB='/nonexistent/lib_scan.so')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and 'ok' in out.stdout, out.stderr


@pytest.mark.parametrize('shape', [(2, 20, 7, 16), (1, 33, 70, 5), (1, 16, 1, 40)])
def test_torch_library_ops_pass_opcheck(shape):
    """Schema, fake implementation (shapes and strides of the real outputs), autograd registration, AOT dispatch."""
    inputs = [t.requires_grad_() for t in make_inputs(*shape, 'normal')]
    for save_states in (True, False):          # a forward that saved no states recomputes them for backward
        result = torch.library.opcheck(scan_cpu.cpu_scan_fwd, (*inputs, 7, save_states))
        assert set(result.values()) == {'SUCCESS'}, result
    plain = [t.detach() for t in inputs]
    y, last, h0s = scan_cpu.cpu_scan_fwd(*plain, 7, True)
    g = torch.Generator().manual_seed(3)
    gy, glast = torch.randn(y.shape, generator=g), torch.randn(last.shape, generator=g)
    for grads in ((gy, glast), (gy, None), (None, glast)):
        result = torch.library.opcheck(scan_cpu.cpu_scan_bwd, (*plain, h0s, *grads, 7))
        assert set(result.values()) == {'SUCCESS'}, result


@pytest.mark.parametrize('shape', [(1, 1, 1, 1), (2, 17, 65, 16), (3, 40, 1000, 33), (1, 16, 64, 16)])
@pytest.mark.parametrize('segment', [1, 7, 64])
def test_saved_state_size_formula_matches_the_kernel(shape, segment):
    assert scan_cpu.h0s_numel(*shape, segment) == scan_cpu._load().dim_scan_h0s_numel(*shape, segment)


def test_fake_outputs_are_the_real_ones_under_a_transposed_input():
    """Non-contiguous inputs: the op copies them to contiguous; outputs are fresh contiguous tensors either way."""
    delta, u, A, B, C = make_inputs(2, 24, 50, 16, 'normal', seed=11)
    nc = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (delta, u, A, B, C)]
    result = torch.library.opcheck(scan_cpu.cpu_scan_fwd, (*nc, 64, True))
    assert set(result.values()) == {'SUCCESS'}, result
    y, last, h0s = scan_cpu.cpu_scan_fwd(*nc, 64, True)
    assert y.is_contiguous() and last.is_contiguous() and h0s.numel() == scan_cpu.h0s_numel(2, 24, 50, 16, 64)


def test_compiles_without_graph_break_and_matches_eager():
    inputs = make_inputs(2, 20, 33, 16, 'normal', seed=4)
    eager = run_kernel(inputs)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda *x: scan_cpu.scan_core(*x, return_last_state=True))(*inputs)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(lambda *x: scan_cpu.scan_core(*x, return_last_state=True), fullgraph=True,
                             backend='aot_eager')
    gy, gl = _loss_weights(inputs, 1)
    x32 = [t.clone().requires_grad_() for t in inputs]
    y, last = compiled(*x32)
    ((y * gy).sum() + (last * gl).sum()).backward()
    torch._dynamo.reset()
    assert torch.equal(y, eager[0]) and torch.equal(last, eager[1])
    for a, b in zip([t.grad for t in x32], eager[2]):
        assert torch.equal(a, b)
