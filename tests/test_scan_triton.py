"""The Triton selective scan (libs/scan/triton_scan.py) run by Triton's interpreter on CPU tensors.

Every test sets TRITON_INTERPRET=1 through monkeypatch (restored afterwards): the module compiles or interprets its
kernels per call from the variable, so the rest of the suite is unaffected. The interpreter runs each program
in numpy one at a time, so shapes are small. The kernels' GPU compilation (no GPU needed) is checked at the end.
"""
import pytest
import torch

from libs.scan import triton_scan as ts
from reference_ops import max_rel_err, scan_inputs, sequential_scan

pytestmark = pytest.mark.skipif(not ts.is_available(), reason=str(ts.unavailable_reason()))

KEYS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
LOW = ('u', 'delta', 'z', 'B', 'C')     # the tensors autocast delivers in bf16


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')


def _run(x, keys, softplus=True, **config):
    """Scan + gradients of a random projection of (out, last state) w.r.t. `keys`, Triton and float64 reference."""
    x = {k: (v.clone().requires_grad_() if k in keys else v.clone()) if v is not None else None for k, v in x.items()}
    x64 = {k: (v.detach().double().requires_grad_(k in keys) if v is not None else None) for k, v in x.items()}
    out, last = ts.scan(**x, delta_softplus=softplus, return_last_state=True, **config)
    ref, last_ref = sequential_scan(**x64, delta_softplus=softplus)
    g = torch.Generator().manual_seed(7)
    gout = torch.randn(out.shape, generator=g).to(out.dtype)   # the gradient reaches the op in out's dtype
    glast = torch.randn(last.shape, generator=g)
    grads = torch.autograd.grad((out * gout).sum() + (last * glast).sum(), [x[k] for k in keys])
    grads_ref = torch.autograd.grad((ref * gout.double()).sum() + (last_ref * glast.double()).sum(),
                                    [x64[k] for k in keys])
    return (out, last, dict(zip(keys, grads))), (ref, last_ref, dict(zip(keys, grads_ref)))


def _assert_close(mine, ref, tol, fp32_tol=1e-5):
    """out and the gradients of low-precision inputs to `tol`; the last state (fp32) and the gradients of fp32
    inputs to `fp32_tol`."""
    (out, last, grads), (out_ref, last_ref, grads_ref) = mine, ref
    assert max_rel_err(out.double(), out_ref) < tol
    assert max_rel_err(last.double(), last_ref) < fp32_tol
    for k in grads:
        assert grads[k].shape == grads_ref[k].shape, k
        bound = fp32_tol if grads[k].dtype == torch.float32 else tol
        assert max_rel_err(grads[k].double(), grads_ref[k]) < bound, k


@pytest.mark.parametrize('L, batch', [(1, 2), (2, 2), (17, 2), (366, 1)])
def test_matches_sequential_scan_in_fp32(L, batch):
    x = scan_inputs(batch, 6, 4, L)
    mine, ref = _run(x, KEYS)
    _assert_close(mine, ref, 1e-5)
    assert mine[0].dtype == torch.float32 and mine[0].shape == (batch, 6, L) and mine[1].shape == (batch, 6, 4)


def test_spans_many_chunks_with_finer_backward_blocks():
    # 7 saved chunks of 16 steps (the last one partial), each recomputed in 4 blocks of 4 steps by the backward
    x = scan_inputs(1, 3, 4, 100, dt_scale='large', seed=2)
    mine, ref = _run(x, KEYS, chunk=16, bwd_chunk=4)
    _assert_close(mine, ref, 1e-5)


@pytest.mark.parametrize('N, chunk, bwd_chunk, block_d, groups', [
    (16, 8, 4, None, (1, 4)),        # DiM's d_state: the backward's 16 states in 4 groups (warps) of 4
    (20, 4, 1, 4, (2, 8)),           # padded to 32: two forward groups; one-step backward blocks; 4 channels a block
])
def test_states_split_over_state_groups(N, chunk, bwd_chunk, block_d, groups):
    # The sums over a state group's states, then over the groups (regrouped through shared memory on a GPU), and
    # the dB / dC sums over a block's channels, at the shapes that use them
    cfg = ts.launch_config(1, 6, 19, N, 'cpu', chunk, bwd_chunk, None, block_d)
    assert (cfg['fwd']['state_groups'], cfg['bwd']['state_groups']) == groups
    x = scan_inputs(1, 6, N, 19, seed=13)
    mine, ref = _run(x, KEYS, chunk=chunk, bwd_chunk=bwd_chunk, block_d=block_d)
    _assert_close(mine, ref, 1e-5)


@pytest.mark.parametrize('D, z, bias, softplus', [(False, False, False, False), (True, False, False, True),
                                                  (False, True, True, False), (False, False, True, True)])
def test_optional_inputs(D, z, bias, softplus):
    x = scan_inputs(2, 5, 3, 13, seed=1)
    if not softplus:   # dt = delta + delta_bias used as it is: keep it positive
        x['delta'], x['delta_bias'] = x['delta'].abs(), torch.rand(5) * 0.1
    for name, keep in (('D', D), ('z', z), ('delta_bias', bias)):
        if not keep:
            x[name] = None
    keys = [k for k in KEYS if x[k] is not None]
    mine, ref = _run(x, keys, softplus=softplus, chunk=8)
    _assert_close(mine, ref, 1e-5)


def test_non_power_of_two_channels_and_states_over_several_channel_blocks():
    # Di = 40 over 3 blocks of 16 (the last one partial), N = 5 padded to 8: dB/dC summed over block partials
    x = scan_inputs(2, 40, 5, 21, seed=3)
    mine, ref = _run(x, KEYS, chunk=8, block_d=16)
    _assert_close(mine, ref, 1e-5)


def test_sequence_split_into_segments_gives_the_unsplit_result():
    # 7 chunks of 8 steps (the last one partial) cut into 3 segments, and into 7 (100 is clamped to one chunk each)
    x = scan_inputs(1, 6, 4, 53, seed=4)
    whole, ref = _run(x, KEYS, chunk=8, bwd_chunk=4, segments=1)
    _assert_close(whole, ref, 1e-5)
    for segments in (3, 100):
        split, _ = _run(x, KEYS, chunk=8, bwd_chunk=4, segments=segments)
        assert max_rel_err(split[0].double(), whole[0].double()) < 1e-6
        assert max_rel_err(split[1].double(), whole[1].double()) < 1e-6
        for k in KEYS:
            assert max_rel_err(split[2][k].double(), whole[2][k].double()) < 1e-5, (segments, k)


def test_bf16_inputs_as_autocast_delivers_them():
    # Reference: the float64 scan of the same bf16-rounded inputs (and of the same bf16 output gradient). What
    # differs is only the final rounding of out and of the bf16 input gradients: bf16 keeps 8 significant bits,
    # an element's rounding error is below 2**-9 = 2e-3 of itself, so below 8e-3 of the largest element with
    # room. The state and every accumulation are fp32: the last state and the gradients of the fp32 A, D and
    # delta_bias match to 1e-5.
    x = scan_inputs(2, 6, 4, 40, seed=5)
    x = {k: v.bfloat16() if k in LOW else v for k, v in x.items()}
    mine, ref = _run(x, KEYS, chunk=8)
    out, last, grads = mine
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert all(grads[k].dtype == x[k].dtype for k in KEYS)
    _assert_close(mine, ref, 8e-3)


def test_mixed_dtypes_and_fp16():
    x = scan_inputs(1, 4, 4, 9, seed=6)
    x.update(u=x['u'].half(), delta=x['delta'].bfloat16(), C=x['C'].half())
    mine, ref = _run(x, KEYS, chunk=4)
    assert mine[0].dtype == torch.float16 and mine[2]['delta'].dtype == torch.bfloat16
    _assert_close(mine, ref, 8e-3)


def test_strided_inputs_are_read_in_place_and_out_keeps_u_layout():
    # the mixer's layout: u, delta, z transposed views of (batch, L, Di) tensors; B, C column slices of one
    # (batch, L, R + 2N) projection
    x = scan_inputs(2, 6, 4, 19, seed=7)
    blc = {k: x[k].transpose(1, 2).contiguous() for k in ('u', 'delta', 'z')}
    proj = torch.cat([torch.randn(2, 19, 3), x['B'].transpose(1, 2), x['C'].transpose(1, 2)], dim=-1)
    strided = dict(x, **{k: v.transpose(1, 2) for k, v in blc.items()},
                   B=proj[..., 3:7].transpose(1, 2), C=proj[..., 7:11].transpose(1, 2))
    assert not strided['u'].is_contiguous() and not strided['B'].is_contiguous()
    mine, ref = _run(strided, KEYS, chunk=8)
    _assert_close(mine, ref, 1e-5)
    assert mine[0].stride() == strided['u'].stride()


def test_deterministic():
    x = scan_inputs(1, 24, 4, 12, seed=8)
    a, _ = _run(x, KEYS, chunk=4, block_d=8, segments=2)
    b, _ = _run(x, KEYS, chunk=4, block_d=8, segments=2)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[2][k], b[2][k]) for k in KEYS)


def test_no_states_are_saved_without_autograd():
    x = scan_inputs(1, 4, 4, 10)
    out, last, states = torch.ops.dim.triton_scan_fwd(
        x['u'], x['delta'], x['A'], x['B'], x['C'], x['D'], x['z'], x['delta_bias'], True, 4, 4, 0, 0, False)
    assert states.shape == (1, 0, 4, 4)
    with torch.no_grad():
        out2 = ts.scan(**{k: v.requires_grad_() for k, v in x.items()}, delta_softplus=True, chunk=4)
    assert torch.equal(out, out2)


def test_cpu_tensors_without_the_interpreter_are_an_error(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET')
    x = scan_inputs(1, 4, 4, 5)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        ts.selective_scan(**x)


def test_rejects_bad_inputs():
    x = scan_inputs(1, 4, 3, 5)
    with pytest.raises(ValueError, match='A must be'):
        ts.selective_scan(x['u'], x['delta'], x['A'][None], x['B'], x['C'])
    with pytest.raises(ValueError, match='B must have shape'):
        ts.selective_scan(x['u'], x['delta'], x['A'], x['B'][:, :2], x['C'])
    with pytest.raises(TypeError, match='u must be'):
        ts.selective_scan(x['u'].double(), x['delta'], x['A'], x['B'], x['C'])
    with pytest.raises(ValueError, match='bwd_chunk'):
        ts.scan(x['u'], x['delta'], x['A'], x['B'], x['C'], chunk=8, bwd_chunk=3)
    with pytest.raises(ValueError, match='L >= 1'):
        ts.selective_scan(x['u'][..., :0], x['delta'][..., :0], x['A'], x['B'][..., :0], x['C'][..., :0])


def test_launch_config_heuristic(monkeypatch):
    cpu = ts.launch_config(2, 40, 366, 16, 'cpu')
    assert cpu['sm_count'] is None and cpu['fwd']['segments'] == cpu['bwd']['segments'] == 1
    assert cpu['fwd']['block_d'] == ts.FWD_BLOCK_D and cpu['fwd']['n_pad'] == cpu['bwd']['n_pad'] == 16
    # the forward keeps a channel's 16 states in one thread; the backward splits them over state groups (warps)
    assert cpu['fwd']['state_groups'] == 1 and cpu['fwd']['num_warps'] == ts.FWD_BLOCK_D // 32
    bwd = cpu['bwd']
    assert bwd['states_per_thread'] * bwd['state_groups'] == 16 and bwd['states_per_thread'] == ts.BWD_STATES_PER_THREAD
    assert bwd['num_warps'] * 32 == bwd['state_groups'] * bwd['block_d'] and bwd['steps'] == ts.BWD_CHUNK
    assert ts.launch_config(1, 6, 10, 5, 'cpu')['fwd']['block_d'] == 8           # next power of two of Di
    big = ts.launch_config(1, 64, 10, 200, 'cpu')
    for p in (big['fwd'], big['bwd']):
        assert p['n_pad'] == 256 and p['states_per_thread'] * p['state_groups'] == 256
        assert p['num_warps'] <= ts.MAX_WARPS and p['state_groups'] <= ts.MAX_STATE_GROUPS
    monkeypatch.setattr(ts, '_sm_count', lambda device: 132)
    full = ts.launch_config(96, 3072, 366, 16)                                     # DiM-H training batch
    assert full['fwd']['segments'] == full['bwd']['segments'] == 1
    long = ts.launch_config(1, 3072, 9806, 16)                                     # DiM-H at 1536 px, batch 1
    for p in (long['fwd'], long['bwd']):
        assert p['segments'] > 1 and p['chunks_per_segment'] >= ts.MIN_CHUNKS_PER_SEGMENT
        assert (p['segments'] - 1) * p['chunks_per_segment'] < p['n_chunks'] <= p['segments'] * p['chunks_per_segment']
        # rounding the segments to whole chunks can lose up to half of them
        wanted = min(ts.WARPS_PER_SM * 132,
                     p['n_dblocks'] * p['num_warps'] * (p['n_chunks'] // ts.MIN_CHUNKS_PER_SEGMENT))
        assert 2 * p['programs'] * p['num_warps'] >= wanted


def test_kernels_of_both_modes_live_in_one_process():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    assert isinstance(ts._kernels(True).scan_bwd_kernel, InterpretedFunction)
    assert isinstance(ts._kernels(False).scan_bwd_kernel, JITFunction)


def _op_args(L=6, grad=True, transposed=False):
    x = scan_inputs(2, 5, 3, L, seed=9)
    if transposed:   # u, delta, z as (batch, L, Di) memory: the fake out must have the real (transposed) strides
        x.update({k: x[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ('u', 'delta', 'z')})
    x = {k: v.requires_grad_(grad) for k, v in x.items()}
    return (x['u'], x['delta'], x['A'], x['B'], x['C'], x['D'], x['z'], x['delta_bias'], True, 4, 2, 2, 4, True)


def test_opcheck_forward_op():
    args = _op_args(transposed=True)
    assert torch.ops.dim.triton_scan_fwd(*args)[0].stride() == args[0].stride() != (30, 6, 1)
    torch.library.opcheck(torch.ops.dim.triton_scan_fwd.default, args)


def test_opcheck_backward_op():
    u, delta, A, B, C, D, z, bias, sp, chunk, bwd_chunk, seg, bd, _ = _op_args(grad=False)
    _, last, states = torch.ops.dim.triton_scan_fwd(u, delta, A, B, C, D, z, bias, sp, chunk, bwd_chunk, seg, bd,
                                                    True)
    gout, glast = torch.randn_like(u), torch.randn_like(last)
    torch.library.opcheck(torch.ops.dim.triton_scan_bwd.default,
                          (gout, glast, u, delta, A, B, C, D, z, bias, states, sp, chunk, bwd_chunk, seg, bd))


def test_torch_compile_fullgraph_forward_and_backward():
    x = {k: v.requires_grad_() for k, v in scan_inputs(1, 4, 3, 9, seed=10).items()}

    def f(u, delta, A, B, C, D, z, delta_bias):
        out, last = ts.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, True)
        return (out * 2).sum() + last.square().sum()

    explained = torch._dynamo.explain(f)(**x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend='aot_eager')
    loss, loss_ref = compiled(**x), f(**x)
    grads = torch.autograd.grad(loss, list(x.values()))
    grads_ref = torch.autograd.grad(loss_ref, list(x.values()))
    assert torch.allclose(loss, loss_ref, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_ref))


@pytest.mark.slow
def test_torch_compile_with_inductor():
    x = {k: v.requires_grad_() for k, v in scan_inputs(1, 4, 3, 9, seed=11).items()}
    f = lambda **kw: ts.selective_scan(**kw, delta_softplus=True).square().sum()
    compiled = torch.compile(f, fullgraph=True)
    loss, loss_ref = compiled(**x), f(**x)
    grads = torch.autograd.grad(loss, list(x.values()))
    grads_ref = torch.autograd.grad(loss_ref, list(x.values()))
    assert torch.allclose(loss, loss_ref, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_ref))


@pytest.mark.slow
def test_long_sequence_with_segments():
    x = scan_inputs(1, 4, 4, 1500, seed=12)
    mine, ref = _run(x, KEYS, chunk=64, bwd_chunk=16, segments=5)
    _assert_close(mine, ref, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('target', ['cuda', 'hip'])
def test_kernels_compile_for_gpus_as_the_launcher_runs_them(target, monkeypatch):
    # Every kernel as the launcher launches it for DiM-H/2 at 1536 px (batch 1: L split into segments, so the
    # carry passes run too), bf16, the mixer's strides: sm_90 cubins (128 registers at most, no spill) and gfx942
    # code objects (what a ROCm build of torch launches). Compiled without a GPU by a stand-in driver.
    from benchmarks.scan_sm90 import compile_shape, kernel_row
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    if ('nvidia' if target == 'cuda' else 'amd') not in backends:
        pytest.skip(f'this triton has no {target} backend')
    monkeypatch.delenv('TRITON_INTERPRET')
    tgt = GPUTarget('cuda', 90, 32) if target == 'cuda' else GPUTarget('hip', 'gfx942', 64)
    launches = [x for x in compile_shape(1, 3072, 9806, 16, 'bf16', target=tgt) if x['kind'] == 'kernel']
    names = {x['name'] for x in launches}
    assert names == {'scan_fwd_kernel', 'segment_carry_kernel', 'scan_bwd_segment_kernel', 'scan_bwd_kernel'}
    bwd = next(x for x in launches if x['name'] == 'scan_bwd_kernel')['args']
    cfg = ts.launch_config(1, 3072, 9806, 16)['bwd']
    assert (bwd['BLOCK_D'], bwd['W'], bwd['T']) == (cfg['block_d'], cfg['state_groups'], cfg['steps'])
    assert (cfg['block_d'], cfg['state_groups'], cfg['steps']) == (ts.BWD_BLOCK_D, 16 // ts.BWD_STATES_PER_THREAD,
                                                                   ts.BWD_CHUNK)
    for x in launches:
        assert ('cubin' if target == 'cuda' else 'hsaco') in x['compiled'].asm, x['name']
        if target == 'cuda':
            row = kernel_row(x)
            assert row['registers'] <= ts.MAX_REGISTERS and row['spill_store_bytes'] == 0, (x['name'], row)


def test_compiled_kernels_decompose_for_inductor(monkeypatch):
    # With compiled (non-interpreted) kernels, AOT autograd traces the op into Triton kernel launches (what Inductor
    # compiles); done on fake CUDA tensors, so no GPU is needed. The forward only: tracing a backward on CUDA
    # tensors needs a CUDA context. Without a CUDA driver the HOP cannot analyse which arguments a kernel writes
    # and assumes all (a warning); on a GPU it can.
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.delenv('TRITON_INTERPRET')
    monkeypatch.setattr(ts, '_sm_count', lambda device: 132)
    mode = FakeTensorMode()
    try:
        with mode:
            x = {k: torch.empty(v.shape, dtype=v.dtype, device='cuda') for k, v in scan_inputs(2, 8, 4, 40).items()}
    except (RuntimeError, AssertionError) as e:
        pytest.skip(f'no fake CUDA tensors in this torch: {e}')
    graphs = []
    traced = aot_function(lambda **kw: ts.selective_scan(**kw, delta_softplus=True, return_last_state=True),
                          fw_compiler=lambda gm, _: graphs.append(gm.code) or gm)
    with mode:
        out, last = traced(**x)
    assert out.shape == (2, 8, 40) and out.device.type == 'cuda' and last.dtype == torch.float32
    assert 'triton_kernel_wrapper_functional' in graphs[0] and 'dim.triton_scan_fwd' not in graphs[0]
