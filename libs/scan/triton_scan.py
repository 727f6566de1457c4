"""Selective scan in Triton (forward and backward), mamba_ssm `selective_scan_fn` semantics, no kernel build.

    dt_t = softplus(delta_t + delta_bias) (or without softplus / bias)
    h_t  = exp(dt_t A) h_{t-1} + dt_t u_t B_t        h_{-1} = 0, state (Di, N) per sample, fp32
    out_t = (C_t . h_t + D u_t) * silu(z_t)          in u's dtype; last state h_{L-1} (batch, Di, N) fp32

Kernels (libs/scan/triton_kernels.py; docs/triton-scan.md gives the design and its sm_90 figures): a program owns
a block of channels of one sample and one segment of L, one channel per thread. The thread keeps its channel's
states (all N in the forward, N / state groups in the backward, whose state groups sit on further warps) in fp32
registers and walks L step by step; per-channel values are loaded, and softplus / SiLU computed, once per
(channel, step), from [channels, steps] tiles along L. B and C are read from one packed fp32 copy,
(batch, L, 2, N_PAD), a row per step. The forward saves the state entering each CHUNK-step chunk
((batch, L/CHUNK, Di, N_PAD) fp32). The backward walks each chunk from its end: it recomputes, from the saved
state, the state entering each BWD_CHUNK-step block of the chunk (to a per-program scratch), then per block (last
first) the block's states (held unrolled in registers) and runs the adjoint recurrence
lambda_t = C_t g_t + exp(dt_{t+1} A) lambda_{t+1} over them. Nothing of size (batch, Di, L, N) exists. When the
grid cannot fill the GPU (small batch, long L), L is cut into segments of whole chunks run in parallel: a first
pass gives each segment's local end state (forward) or start adjoint (backward) and its dt sum, a small carry pass
chains the segments (a segment's total decay is exp(A sum dt)), and the main pass starts from the carry. dB and dC (sums over channels) are summed over each
program's channels in the kernel and written once per channel block, (batch, Di / BWD_BLOCK_D, L, 2, N_PAD),
dA, dD and dbias as per-(sample, segment) partials; the launcher sums the partials: no atomics, results are
deterministic.

Registered as torch.library ops `dim::triton_scan_fwd` / `dim::triton_scan_bwd` (`triton_op`): fake impls share
the real allocation code, autograd is registered on the forward op. Under the interpreter the ops stay opaque to
torch.compile (an interpreted kernel cannot be traced); with compiled kernels Inductor sees the kernels.

Device: CUDA tensors (NVIDIA, and ROCm builds of torch, whose HIP GPUs are 'cuda' devices); CPU tensors only with
Triton's interpreter (TRITON_INTERPRET=1, read at each call: kernels are compiled or interpreted per call).

Tuning knobs (module constants, read at each call; `launch_config` reports what a shape gets). The defaults
come from ahead-of-time sm_90 compiles (benchmarks/scan_sm90.py: registers, spills, SASS per channel-step), not
from timings: no GPU has run these kernels yet.
  CHUNK           steps per saved state: saved memory batch*Di*N_PAD*L/CHUNK*4 bytes per call
  BWD_CHUNK       steps per backward block, unrolled: its states stay in registers (BWD_CHUNK x the states a
                  thread holds); a power of two dividing CHUNK, CHUNK/BWD_CHUNK <= MAX_BLOCKS_PER_CHUNK
  FWD_STEPS       steps per forward tile along L (a power of two; at most BWD_CHUNK, so it divides CHUNK)
  FWD_BLOCK_D, BWD_BLOCK_D                  channels per program (powers of two; 32 per warp)
  FWD_STATES_PER_THREAD, BWD_STATES_PER_THREAD   states a thread holds; N_PAD / this many state groups (warps),
                  at most MAX_STATE_GROUPS, a program at most MAX_WARPS warps (large d_state)
  WARPS_PER_SM    split L while the grid has fewer warps than WARPS_PER_SM x SMs ...
  MIN_CHUNKS_PER_SEGMENT  ... keeping at least this many chunks per segment
  MAX_REGISTERS   registers per thread ptxas may use (NVIDIA; 0: its choice): 128 lets 16 warps share an SM
"""
import importlib.util
import os
import sys
import threading
from typing import Optional

import torch

__all__ = ['is_available', 'unavailable_reason', 'selective_scan', 'scan', 'launch_config', 'interpreting',
           'CHUNK', 'BWD_CHUNK', 'FWD_STEPS', 'FWD_BLOCK_D', 'BWD_BLOCK_D', 'FWD_STATES_PER_THREAD',
           'BWD_STATES_PER_THREAD', 'WARPS_PER_SM', 'MIN_CHUNKS_PER_SEGMENT', 'MAX_BLOCKS_PER_CHUNK', 'MAX_REGISTERS']

CHUNK = 16
BWD_CHUNK = 4
FWD_STEPS = 4
FWD_BLOCK_D = 32
BWD_BLOCK_D = 64
FWD_STATES_PER_THREAD = 16
BWD_STATES_PER_THREAD = 4
WARPS_PER_SM = 8
MIN_CHUNKS_PER_SEGMENT = 4
MAX_BLOCKS_PER_CHUNK = 16
MAX_REGISTERS = 128
MAX_STATE_GROUPS = 8      # large d_state: more states per thread rather than more warps ...
MAX_WARPS = 16            # ... and fewer channels per program, so that a program has at most 16 warps
MAX_D_STATE = 256

_IO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    import triton
    from torch.library import triton_op, wrap_triton
    _import_error = None
except Exception as e:  # no triton (CPU-only torch wheels), or a torch without triton_op (< 2.6)
    triton = None
    _import_error = f"{type(e).__name__}: {e}"


def is_available() -> bool:
    """True when triton and torch.library.triton_op are importable. Never raises."""
    return triton is not None


def unavailable_reason() -> Optional[str]:
    return None if is_available() else f"the Triton scan needs triton and torch >= 2.6 ({_import_error})"


def interpreting() -> bool:
    """Whether Triton's interpreter is on (TRITON_INTERPRET, or triton.knobs.runtime.interpret) right now."""
    knobs = getattr(triton, 'knobs', None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get('TRITON_INTERPRET', '0') == '1'   # triton < 3.4 reads the variable this way


# ----------------------------------------------------------------------------------------------------------------
# Kernels: @triton.jit picks compiled vs interpreted when the kernel is *defined*, so triton_kernels.py is loaded
# once per mode as its own module, with the mode forced while it is defined.

_kernel_modules = {}
_kernel_lock = threading.Lock()


def _load_module(stem, interpret):
    """libs/scan/<stem>.py as its own module, its @triton.jit functions compiled or interpreted per `interpret`."""
    name = f"{__package__}._{stem}_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f'{stem}.py'))
    mod = importlib.util.module_from_spec(spec)
    knobs = getattr(triton, 'knobs', None)
    if knobs is not None:   # triton >= 3.4; scope() restores the knob and the environment variable
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            spec.loader.exec_module(mod)
    else:                   # older triton reads TRITON_INTERPRET in @triton.jit
        saved = os.environ.get('TRITON_INTERPRET')
        os.environ['TRITON_INTERPRET'] = '1' if interpret else '0'
        try:
            spec.loader.exec_module(mod)
        finally:
            if saved is None:
                del os.environ['TRITON_INTERPRET']
            else:
                os.environ['TRITON_INTERPRET'] = saved
    sys.modules[name] = mod
    return mod


def _kernels(interpret):
    """The kernels module (triton_kernels.py) of one mode, with its tile helpers (triton_tiles.py) of that mode."""
    mod = _kernel_modules.get(interpret)
    if mod is not None:
        return mod
    with _kernel_lock:
        if interpret not in _kernel_modules:
            from triton.runtime.jit import JITFunction
            if not interpret and not isinstance(triton.language.standard._sum_combine, JITFunction):
                raise RuntimeError("triton was imported with TRITON_INTERPRET=1, so its own library is "
                                   "interpreted and compiled kernels cannot use it: unset it before starting")
            mod = _load_module('triton_kernels', interpret)
            mod.tiles = _load_module('triton_tiles', interpret)
            _kernel_modules[interpret] = mod
    return _kernel_modules[interpret]


def _check_device(device):
    if device.type == 'cuda':
        return
    if device.type == 'cpu':
        if interpreting():
            return
        raise RuntimeError("the Triton scan runs on CPU tensors only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 (slow, meant for tests), or pick the C kernel / PyTorch scan with "
                           "DIM_SCAN_BACKEND=cpu or DIM_SCAN_BACKEND=torch")
    raise RuntimeError(f"the Triton scan runs on CUDA (or ROCm) tensors, got device {device}")


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration

def _pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def _log2(x):
    return int(x).bit_length() - 1


def _sm_count(device):
    device = torch.device(device)
    if device.type != 'cuda' or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def n_pad(d_state):
    """States per channel in the kernels and their buffers: d_state rounded up to a power of two."""
    return _pow2(d_state)


def _pass_config(batch, d_inner, L, d_state, chunk, steps, block_d, states_per_thread, segments, sm_count):
    n_chunks = -(-L // chunk)
    pad = n_pad(d_state)
    per_thread = max(min(pad, _pow2(states_per_thread)), pad // MAX_STATE_GROUPS)
    groups = pad // per_thread
    block_d = max(2, min(_pow2(block_d), _pow2(d_inner), 32 * MAX_WARPS // groups))
    num_warps = max(1, groups * block_d // 32)
    n_dblocks = -(-d_inner // block_d)
    if segments is None:
        segments = 1
        warps = batch * n_dblocks * num_warps
        if sm_count is not None and warps < WARPS_PER_SM * sm_count:
            segments = -(-WARPS_PER_SM * sm_count // warps)
            segments = max(1, min(segments, n_chunks // MIN_CHUNKS_PER_SEGMENT))
    chunks_per_segment = -(-n_chunks // max(1, min(int(segments), n_chunks)))
    segments = -(-n_chunks // chunks_per_segment)
    return dict(chunk=chunk, n_chunks=n_chunks, steps=steps, block_d=block_d, n_pad=pad,
                states_per_thread=per_thread, state_groups=groups, num_warps=num_warps, n_dblocks=n_dblocks,
                segments=segments, chunks_per_segment=chunks_per_segment, programs=n_dblocks * batch * segments)


def _chunks(chunk, bwd_chunk):
    """(chunk, bwd_chunk) with the knobs' defaults; bwd_chunk defaults to the largest power of two dividing chunk
    that is <= BWD_CHUNK."""
    chunk = int(chunk or CHUNK)
    if not bwd_chunk:
        bwd_chunk = 1
        while bwd_chunk * 2 <= min(BWD_CHUNK, chunk) and chunk % (bwd_chunk * 2) == 0:
            bwd_chunk *= 2
    bwd_chunk = int(bwd_chunk)
    if (chunk < 1 or bwd_chunk < 1 or bwd_chunk & (bwd_chunk - 1) or chunk % bwd_chunk
            or chunk // bwd_chunk > MAX_BLOCKS_PER_CHUNK):
        raise ValueError(f"need chunk >= 1 and bwd_chunk a power of two dividing it with chunk / bwd_chunk <= "
                         f"{MAX_BLOCKS_PER_CHUNK}, got chunk={chunk}, bwd_chunk={bwd_chunk}")
    return chunk, bwd_chunk


def launch_config(batch, d_inner, L, d_state, device='cuda', chunk=None, bwd_chunk=None, segments=None,
                  block_d=None):
    """The launch configuration `selective_scan` uses for this shape on `device`.

    Returns dict(sm_count, fwd={...}, bwd={...}); each pass: chunk, n_chunks, steps (per unrolled block), block_d,
    n_pad, states_per_thread, state_groups, num_warps, n_dblocks, segments, chunks_per_segment, programs. The
    arguments override the knobs (segments=None: split L only when the grid has fewer than WARPS_PER_SM x SMs
    warps; never on CPU; block_d: both passes).
    """
    chunk, bwd_chunk = _chunks(chunk, bwd_chunk)
    if segments is not None and int(segments) < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    sm = _sm_count(device)
    fwd_steps = min(_pow2(FWD_STEPS), bwd_chunk)
    fwd = _pass_config(batch, d_inner, L, d_state, chunk, fwd_steps, block_d or FWD_BLOCK_D, FWD_STATES_PER_THREAD,
                       segments, sm)
    bwd = _pass_config(batch, d_inner, L, d_state, chunk, bwd_chunk, block_d or BWD_BLOCK_D, BWD_STATES_PER_THREAD,
                       segments, sm)
    return dict(sm_count=sm, fwd=fwd, bwd=bwd)


def _strides(t, dims=3):
    return tuple(t.stride()) if t is not None else (0,) * dims


def _or(t, default):
    return t if t is not None else default


def _layout(cfg):
    """The constexprs of a pass's state layout and its launch options."""
    opts = dict(BLOCK_D=cfg['block_d'], W=cfg['state_groups'], NW=cfg['states_per_thread'],
                LOG_NW=_log2(cfg['states_per_thread']), num_warps=cfg['num_warps'])
    if MAX_REGISTERS and torch.version.hip is None and not interpreting():
        opts['maxnreg'] = MAX_REGISTERS        # ptxas's cap (NVIDIA only): 4 warps per scheduler fit in 64K
    return opts


def _steps(cfg):
    return dict(T=cfg['steps'], LOG_T=_log2(cfg['steps']))


# ----------------------------------------------------------------------------------------------------------------
# Forward / backward implementations (shared by the real ops and their fake impls: launch=False allocates only)

def _pack_bc(B, C, pad, tail):
    """B, C (batch, N, L) any strides and dtype -> (batch, L + tail, 2, pad) fp32 contiguous, padded states and the
    tail rows zero."""
    batch, N, L = B.shape
    bc = B.new_empty((batch, L + tail, 2, pad), dtype=torch.float32)
    if pad > N:
        bc[:, :L, :, N:] = 0
    bc[:, L:] = 0
    bc[:, :L, 0, :N] = B.transpose(1, 2)
    bc[:, :L, 1, :N] = C.transpose(1, 2)
    return bc


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, bwd_chunk, segments, block_d, save_states,
             launch):
    batch, Di, L = u.shape
    N = A.shape[1]
    out = torch.empty_like(u)
    last = u.new_empty((batch, Di, N), dtype=torch.float32)
    states = u.new_empty((batch, (L + chunk - 1) // chunk if save_states else 0, Di, n_pad(N)), dtype=torch.float32)
    if not launch:
        return out, last, states
    k = _kernels(interpreting())
    cfg = launch_config(batch, Di, L, N, u.device, chunk, bwd_chunk, segments or None, block_d or None)['fwd']
    n_seg, nd, pad = cfg['segments'], cfg['n_dblocks'], cfg['n_pad']
    bc = _pack_bc(B, C, pad, bwd_chunk)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                 **_layout(cfg), **_steps(cfg))
    args = (u, delta, A, bc, _or(D, u), _or(z, u), _or(delta_bias, u))
    strides = (*u.stride(), *delta.stride(), *_strides(z))
    carry = None
    if n_seg > 1:
        ends = u.new_empty((batch, n_seg, Di, pad), dtype=torch.float32)
        dtsum = u.new_empty((batch, n_seg, Di), dtype=torch.float32)
        carry = torch.empty_like(ends)
        wrap_triton(k.scan_fwd_kernel)[(nd, batch, n_seg)](
            *args, dtsum, ends, u, u, L, bc.shape[1], Di, N, chunk, cfg['chunks_per_segment'], *strides, 0, 0, 0,
            HAS_CARRY=False, SAVE_STATES=False, ENDS_ONLY=True, **flags)
        wrap_triton(k.segment_carry_kernel)[(nd, batch)](
            ends, dtsum, A, ends, carry, n_seg, Di, N, 0, 0, 0, HAS_INIT=False, REVERSE=False, **_layout(cfg))
    wrap_triton(k.scan_fwd_kernel)[(nd, batch, n_seg)](
        *args, out, last, states, _or(carry, u), L, bc.shape[1], Di, N, chunk, cfg['chunks_per_segment'], *strides,
        *out.stride(),
        HAS_CARRY=carry is not None, SAVE_STATES=states.numel() > 0, ENDS_ONLY=False, **flags)
    return out, last, states


def _backward(gout, glast, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, chunk, bwd_chunk, segments,
              block_d, launch):
    batch, Di, L = u.shape
    N = A.shape[1]
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    if not launch:
        return (du, ddelta, torch.empty_like(A, memory_format=torch.contiguous_format),
                B.new_empty((batch, N, L)), C.new_empty((batch, N, L)),
                D.new_empty(D.shape) if D is not None else u.new_empty(0), dz,
                delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else u.new_empty(0))
    if states.shape[1] != (L + chunk - 1) // chunk:
        raise RuntimeError("dim::triton_scan_bwd needs the states saved by the forward (save_states=True)")
    k = _kernels(interpreting())
    cfg = launch_config(batch, Di, L, N, u.device, chunk, bwd_chunk, segments or None, block_d or None)['bwd']
    n_seg, nd, pad = cfg['segments'], cfg['n_dblocks'], cfg['n_pad']
    f32 = dict(dtype=torch.float32)
    bc = _pack_bc(B, C, pad, bwd_chunk)
    dBC_part = u.new_empty((batch, nd, L, 2, pad), **f32)
    dA_part = u.new_empty((batch, n_seg, pad, Di), **f32)
    dD_part = u.new_empty((batch, n_seg, Di), **f32)
    dbias_part = u.new_empty((batch, n_seg, Di), **f32)
    flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, **_layout(cfg),
                 **_steps(cfg))
    grid = (nd, batch, n_seg)
    init, init_strides, init_mode = u, (0, 0, 0), 0
    if glast is not None:
        init, init_strides, init_mode = glast, tuple(glast.stride()), 1
    if n_seg > 1:
        nus = u.new_empty((batch, n_seg, Di, pad), **f32)
        dtsum = u.new_empty((batch, n_seg, Di), **f32)
        carry = torch.empty_like(nus)
        wrap_triton(k.scan_bwd_segment_kernel)[grid](
            gout, delta, A, bc, _or(z, u), _or(delta_bias, u), nus, dtsum, L, bc.shape[1], Di, N, chunk,
            cfg['chunks_per_segment'], *gout.stride(), *delta.stride(), *_strides(z), **flags)
        wrap_triton(k.segment_carry_kernel)[(nd, batch)](
            nus, dtsum, A, init, carry, n_seg, Di, N, *init_strides, HAS_INIT=init_mode == 1, REVERSE=True,
            **_layout(cfg))
        init, init_strides, init_mode = carry, (0, 0, 0), 2
    red = min(8, cfg['block_d'])
    entries = u.new_empty((nd * batch * n_seg, chunk // bwd_chunk, pad, cfg['block_d']), **f32)
    wrap_triton(k.scan_bwd_kernel)[grid](
        gout, u, delta, A, bc, _or(D, u), _or(z, u), _or(delta_bias, u), states, init,
        du, ddelta, dz if z is not None else u, dBC_part, dA_part, dD_part, dbias_part, entries,
        L, bc.shape[1], Di, N, cfg['chunks_per_segment'],
        *gout.stride(), *u.stride(), *delta.stride(), *_strides(z), *init_strides, *du.stride(), *ddelta.stride(),
        *_strides(dz if z is not None else None), INIT=init_mode, HAS_D=D is not None, CHUNK=chunk, RED=red,
        LOG_RED=_log2(red), LOG_W=_log2(cfg['state_groups']), **flags)
    dBC = dBC_part.sum(1)
    contiguous = dict(memory_format=torch.contiguous_format, copy=True)     # views of one sum: copies, never views
    dB = dBC[:, :, 0, :N].transpose(1, 2).to(B.dtype, **contiguous)
    dC = dBC[:, :, 1, :N].transpose(1, 2).to(C.dtype, **contiguous)
    dA = dA_part.sum((0, 1))[:N].t().to(A.dtype, **contiguous)
    dD = dD_part.sum((0, 1)).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = dbias_part.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops

def _decomposition_disabled():
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def _functional_rule(impl):
    """FunctionalTensorMode rule replacing triton_op's: decompose into the kernel launches (Inductor then sees the
    kernels) only when they are compiled; an interpreted kernel cannot be traced, so the op stays opaque."""
    def rule(mode, op, types, args, kwargs):
        if interpreting() or _decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return impl(*args, **kwargs)
    return rule


if triton is not None:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    @triton_op("dim::triton_scan_fwd", mutates_args=())
    def _fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                delta_softplus: bool, chunk: int, bwd_chunk: int, segments: int, block_d: int,
                save_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> out (u's shape, dtype, layout), last state (batch, Di, N) fp32, states (batch, n_chunks or 0, Di, N_PAD).
        segments, block_d: 0 = the heuristic."""
        _check_device(u.device)
        return _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, bwd_chunk, segments, block_d,
                        save_states, launch=True)

    @triton_op("dim::triton_scan_bwd", mutates_args=())
    def _bwd_op(gout: torch.Tensor, glast: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
                A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], states: torch.Tensor,
                delta_softplus: bool, chunk: int, bwd_chunk: int, segments: int, block_d: int) -> tuple[
                    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                    torch.Tensor, torch.Tensor]:
        """-> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (each in its input's dtype; absent inputs: empty)."""
        _check_device(u.device)
        return _backward(gout, glast, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, chunk, bwd_chunk,
                         segments, block_d, launch=True)

    @_fwd_op.register_fake
    def _(*args):
        return _forward(*args, launch=False)

    @_bwd_op.register_fake
    def _(*args):
        return _backward(*args, launch=False)

    _fwd_op.register_torch_dispatch(FunctionalTensorMode, _functional_rule(lambda *a: _forward(*a, launch=True)))
    _bwd_op.register_torch_dispatch(FunctionalTensorMode, _functional_rule(lambda *a: _backward(*a, launch=True)))

    def _setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, z, delta_bias = inputs[:8]
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
        ctx.config = inputs[8:13]          # delta_softplus, chunk, bwd_chunk, segments, block_d
        ctx.save_states = inputs[13]

    def _backward_formula(ctx, gout, glast, _gstates):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        if not ctx.save_states:
            raise RuntimeError("dim::triton_scan_fwd was called with save_states=False: no backward")
        du, ddelta, dA, dB, dC, dD, dz, dbias = _bwd_op(gout, glast, u, delta, A, B, C, D, z, delta_bias, states,
                                                        *ctx.config)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                dbias if delta_bias is not None else None) + (None,) * 6

    _fwd_op.register_autograd(_backward_formula, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points

def _validate(u, delta, A, B, C, D, z, delta_bias):
    if not is_available():
        raise RuntimeError(unavailable_reason())
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, Di, L), got shape {tuple(u.shape)}")
    batch, Di, L = u.shape
    if A.dim() != 2 or A.shape[0] != Di or A.is_complex() or not A.is_floating_point():
        raise ValueError(f"A must be a real (Di, N) = ({Di}, N) tensor, got {tuple(A.shape)} {A.dtype}")
    N = A.shape[1]
    if min(batch, Di, L, N) < 1 or N > MAX_D_STATE:
        raise ValueError(f"the Triton scan needs batch, Di, L >= 1 and 1 <= N <= {MAX_D_STATE}, "
                         f"got {(batch, Di, L, N)}")
    named = dict(u=(u, (batch, Di, L)), delta=(delta, (batch, Di, L)), z=(z, (batch, Di, L)),
                 B=(B, (batch, N, L)), C=(C, (batch, N, L)), D=(D, (Di,)), delta_bias=(delta_bias, (Di,)))
    for name, (t, shape) in named.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if name in ('u', 'delta', 'z', 'B', 'C') and t.dtype not in _IO_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in dict(delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias).items():
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device}, u on {u.device}: all scan inputs must share a device")


def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, *,
         chunk=None, bwd_chunk=None, segments=None, block_d=None):
    """`selective_scan` with the launch configuration overridable (tests, tuning): `chunk` steps per saved state,
    `bwd_chunk` steps per backward block (divides chunk), `segments` pieces of L run in parallel (None: the
    heuristic), `block_d` channels per program (None: FWD_BLOCK_D / BWD_BLOCK_D)."""
    _validate(u, delta, A, B, C, D, z, delta_bias)
    chunk, bwd_chunk = _chunks(chunk, bwd_chunk)
    if (segments is not None and segments < 1) or (block_d is not None and block_d < 1):
        raise ValueError(f"segments and block_d must be >= 1, got {segments}, {block_d}")
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    out, last, _ = torch.ops.dim.triton_scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk,
                                                 bwd_chunk, int(segments or 0), int(block_d or 0), save)
    return (out, last) if return_last_state else out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """out = (scan(u) + D*u) * silu(z), as mamba_ssm's `selective_scan_fn`.

    u, delta, z: (batch, Di, L) fp32/bf16/fp16, any strides; A: (Di, N) real; B, C: (batch, N, L) any strides;
    D, delta_bias: (Di,). Returns out (batch, Di, L) in u's dtype (u's layout where it is dense), and the last
    state (batch, Di, N) fp32 if asked. State and accumulation in fp32; gradients in the inputs' dtypes.
    CUDA tensors; CPU tensors only with TRITON_INTERPRET=1.
    """
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
