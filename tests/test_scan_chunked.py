"""The pure-PyTorch chunked scan core against a sequential scan, values and gradients."""
import pytest
import torch

from libs.scan.chunked import chunk_length, scan_core
from reference_ops import max_rel_err, scan_inputs, sequential_scan


def _core_inputs(batch, d_inner, d_state, L, dtype, dt_scale='normal', seed=0):
    x = scan_inputs(batch, d_inner, d_state, L, dtype, dt_scale, seed)
    delta = torch.nn.functional.softplus(x['delta'] + x['delta_bias'][:, None])
    return [t.clone().requires_grad_() for t in (delta, x['u'], x['A'], x['B'], x['C'])]


def _check(L, chunk=None, batch=2, d_inner=6, d_state=4, dt_scale='normal', tol=1e-5, seed=0):
    fp32 = _core_inputs(batch, d_inner, d_state, L, torch.float32, dt_scale, seed)
    fp64 = [t.detach().double().requires_grad_() for t in fp32]
    y, last = scan_core(*fp32, return_last_state=True, chunk=chunk)
    y_ref, last_ref = sequential_scan(fp64[1], fp64[0], fp64[2], fp64[3], fp64[4])
    g = torch.Generator().manual_seed(1)
    gy, glast = torch.randn(y.shape, generator=g), torch.randn(last.shape, generator=g)
    grads = torch.autograd.grad((y * gy).sum() + (last * glast).sum(), fp32)
    grads_ref = torch.autograd.grad((y_ref * gy.double()).sum() + (last_ref * glast.double()).sum(), fp64)
    assert max_rel_err(y.double(), y_ref) < tol
    assert max_rel_err(last.double(), last_ref) < tol
    for name, a, b in zip(('delta', 'u', 'A', 'B', 'C'), grads, grads_ref):
        assert max_rel_err(a.double(), b) < tol, name


@pytest.mark.parametrize('L', [1, 2, 7, 8, 9, 63, 65, 366])
def test_matches_sequential_scan(L):
    _check(L)


@pytest.mark.parametrize('L, chunk', [(100, 3), (1000, 8), (37, 64)])
def test_chunk_sizes_and_recursive_carry(L, chunk):
    # chunk 8 at L=1000 gives 125 chunks: the carry recurrence itself is chunked (recursion)
    _check(L, chunk=chunk)


def test_large_dt_is_stable_and_exact():
    _check(300, dt_scale='large')


def test_long_sequence_has_no_overflow():
    L = 9100
    delta, u, A, B, C = _core_inputs(1, 3, 4, L, torch.float32, dt_scale='large', seed=3)
    y, last = scan_core(delta, u, A, B, C, return_last_state=True)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(t.grad).all() for t in (delta, u, A, B, C))
    with torch.no_grad():
        y_ref, _ = sequential_scan(u[..., -400:].double(), delta[..., -400:].double(), A.double(),
                                   B[..., -400:].double(), C[..., -400:].double())
    # dt ~ 2.5 forgets the past within a few steps, so the tail equals a scan of the tail alone
    assert max_rel_err(y[..., -300:].double(), y_ref[..., -300:]) < 1e-5


def test_long_sequence_matches_sequential_scan():
    _check(9001, batch=1, d_inner=2, d_state=2, seed=5)


def test_chunk_length_stays_in_range():
    assert [chunk_length(L) for L in (1, 64, 366, 9806)] == [8, 8, 20, 64]


def test_autocast_does_not_lower_the_scan_precision():
    """vecdot / einsum inside the scan would run in bf16 under CPU autocast: the scan turns autocast off."""
    delta, u, A, B, C = _core_inputs(2, 6, 4, 50, torch.float32)
    y32, _ = scan_core(delta, u, A, B, C)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, _ = scan_core(delta, u, A, B, C)
        g = torch.autograd.grad(y.sum(), [delta, B])
    g32 = torch.autograd.grad(y32.sum(), [delta, B])
    assert y.dtype == torch.float32 and max_rel_err(y.double(), y32.double()) < 1e-6
    for a, b in zip(g, g32):
        assert max_rel_err(a.double(), b.double()) < 1e-6


def test_dynamo_traces_the_autograd_function_without_graph_breaks():
    delta, u, A, B, C = _core_inputs(1, 3, 2, 20, torch.float32)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda: scan_core(delta, u, A, B, C, chunk=8))()
    torch._dynamo.reset()
    assert explain.graph_break_count == 0 and explain.graph_count == 1
