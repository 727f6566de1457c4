"""Fused CPU selective-scan core (optional compiled backend).

The kernel (``libs/scan/csrc/scan_cpu.c``, plain C, no torch or Python headers) is built by ``pip install -e .`` as the
optional extension ``libs.scan._cpu_kernel`` and loaded here with ctypes. If it was not built (no compiler, or the
build failed), :func:`is_available` is False and the caller uses the pure-PyTorch backend instead.

Contract (mamba_ssm's ``selective_scan_ref`` recurrence, softplus/bias, D skip and z gate left to the caller)::

    y, last_state = scan_core(delta, u, A, B, C, return_last_state=False)

    delta, u: (batch, D, L)   delta is the effective dt (already softplus'd / biased)
    A:        (D, N)
    B, C:     (batch, N, L)
    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * u_t) B_t,  h_{-1} = 0;  y_t = sum_n C_t[n] h_t[:, n]
    y: (batch, D, L); last_state: h_{L-1}, (batch, D, N), or None

CPU float32 only. Differentiable w.r.t. all five inputs (and through last_state). The kernel is registered as the
torch.library ops ``dim::cpu_scan_fwd`` / ``dim::cpu_scan_bwd`` (fake implementations with the real output shapes and
strides, autograd on the forward op), so torch.compile traces through it without a graph break. The forward keeps
the state in registers and saves only the states at segment boundaries (every ``SEGMENT`` steps); the backward
recomputes each segment's states and runs the reverse recurrence, all in the compiled kernel. Nothing of size
(batch, D, L, N) is ever allocated. Work is split over (batch, 16-channel blocks) on ``torch.get_num_threads()`` threads; results are
bit-identical for any thread count. The kernel is compiled for AVX-512, AVX2+FMA and the baseline ISA (SSE2, or NEON on
aarch64) and runs the best one the CPU has (:func:`isa`); docs/cpu-scan.md describes its design and speed.

Threads: the caller plus torch.get_num_threads()-1 helper pthreads created per call claim work units from a shared
counter; the caller waits only for units a helper actually took, so a helper that cannot get a core (oversubscribed
machine, torch's OpenMP workers still spin-waiting after a torch op) costs nothing. ``DIM_SCAN_CPU_THREADING=openmp``
runs the units on torch's own OpenMP team instead (better for small calls on an idle machine, much worse on an
oversubscribed one).

Environment: ``DIM_SCAN_CPU_LIB`` = path of the shared library to load instead of the built one;
``DIM_SCAN_CPU_DISABLE=1`` makes :func:`is_available` return False; ``DIM_SCAN_CPU_THREADING`` = pthreads (default) |
openmp.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import importlib.util
import os
import threading
import warnings

import torch

__all__ = ["is_available", "unavailable_reason", "scan_core", "cpu_scan_fwd", "cpu_scan_bwd", "h0s_numel",
           "library_path", "isa", "threading_backend", "SEGMENT"]

#: Segment length K of the saved states (backward memory ~ batch*D*N*L/K floats); chosen by measurement.
SEGMENT = 64
_ABI = 1
_ISA_NAMES = {1: "generic", 2: "avx2", 3: "avx512"}
_ISA_CODES = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}

_lock = threading.Lock()
_lib = None
_lib_path = None
_load_error = None
_loaded = False


def _candidates():
    env = os.environ.get("DIM_SCAN_CPU_LIB")
    if env:
        yield env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        yield os.path.join(here, "_cpu_kernel" + suffix)
    # an editable install may map the package elsewhere; ask the import system without importing
    try:
        spec = importlib.util.find_spec(__package__ + "._cpu_kernel") if __package__ else None
        if spec is not None and spec.origin:
            yield spec.origin
    except (ImportError, ValueError):
        pass
    yield from sorted(glob.glob(os.path.join(here, "_cpu_kernel*.so")))


def _load():
    global _lib, _lib_path, _load_error, _loaded
    if _loaded:
        return _lib
    with _lock:
        if _loaded:
            return _lib
        errors = []
        if os.environ.get("DIM_SCAN_CPU_DISABLE", "") not in ("", "0"):
            errors.append("disabled by DIM_SCAN_CPU_DISABLE")
        else:
            for path in _candidates():
                if not os.path.isfile(path):
                    continue
                try:
                    lib = ctypes.CDLL(path)
                    if lib.dim_scan_abi_version() != _ABI:
                        errors.append(f"{path}: ABI {lib.dim_scan_abi_version()} != {_ABI} (rebuild: pip install -e .)")
                        continue
                    _declare(lib)
                    try:
                        _set_threading(lib)
                    except (ValueError, RuntimeError) as e:  # a bad DIM_SCAN_CPU_THREADING: keep the default
                        warnings.warn(f"scan_cpu: {e}; using pthreads")
                        _set_threading(lib, 'pthreads')
                    _lib, _lib_path = lib, path
                    break
                except (OSError, AttributeError) as e:  # unloadable or foreign file
                    errors.append(f"{path}: {e}")
        if _lib is None:
            _load_error = "; ".join(errors) or "libs/scan/_cpu_kernel*.so not found (not built: pip install -e .)"
        _loaded = True
        return _lib


def _declare(lib):
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dim_scan_abi_version.restype = I
    lib.dim_scan_active_isa.restype = I
    lib.dim_scan_force_isa.argtypes = [I]
    lib.dim_scan_force_isa.restype = None
    lib.dim_scan_h0s_numel.argtypes = [I64] * 5
    lib.dim_scan_h0s_numel.restype = I64
    lib.dim_scan_fwd.argtypes = [P] * 8 + [I64] * 5 + [I]
    lib.dim_scan_fwd.restype = I
    lib.dim_scan_bwd.argtypes = [P] * 13 + [I64] * 5 + [I]
    lib.dim_scan_bwd.restype = I
    lib.dim_scan_exp.argtypes = [P, P, I64]
    lib.dim_scan_exp.restype = None
    lib.dim_scan_set_gomp_parallel.argtypes = [P]
    lib.dim_scan_set_gomp_parallel.restype = None
    lib.dim_scan_uses_openmp.restype = I


def _torch_openmp_parallel():
    """Address of GOMP_parallel in the OpenMP runtime torch runs on (libgomp, or the GOMP layer of libiomp5 / LLVM
    libomp), or None. Running our worker threads there reuses torch's intra-op threads instead of competing with
    them while they spin-wait after a torch op."""
    try:
        if not torch.backends.openmp.is_available() or 'OpenMP' not in torch.__config__.parallel_info():
            return None
        with open('/proc/self/maps') as f:
            libs = {line.split()[-1] for line in f if line.rstrip().endswith(('.so', '.dylib')) or '.so.' in line}
    except Exception:  # no /proc (macOS, ...), or an unexpected torch build
        return None
    omp = sorted(path for path in libs
                 if os.path.basename(path).split('.')[0].split('-')[0] in ('libgomp', 'libiomp5', 'libomp'))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    ours = [path for path in omp if path.startswith(torch_dir)]
    candidates = ours or (omp if len(omp) == 1 else [])
    for path in candidates:
        try:
            fn = ctypes.CDLL(path).GOMP_parallel
            return ctypes.cast(fn, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def _set_threading(lib, mode=None):
    mode = (mode or os.environ.get('DIM_SCAN_CPU_THREADING', 'pthreads')).strip().lower()
    if mode not in ('openmp', 'pthreads'):
        raise ValueError(f"DIM_SCAN_CPU_THREADING must be pthreads or openmp, got {mode!r}")
    addr = None if mode == 'pthreads' else _torch_openmp_parallel()
    if mode == 'openmp' and addr is None:
        raise RuntimeError("DIM_SCAN_CPU_THREADING=openmp but torch's OpenMP runtime was not found")
    lib.dim_scan_set_gomp_parallel(ctypes.c_void_p(addr) if addr else None)


def is_available() -> bool:
    """True when the compiled kernel is present and loadable. Never raises."""
    try:
        return _load() is not None
    except Exception as e:  # pragma: no cover - defensive
        global _load_error
        _load_error = repr(e)
        return False


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False (None when it is True)."""
    return None if is_available() else _load_error


def library_path() -> str | None:
    return _lib_path if is_available() else None


def threading_backend(force: str | None = None) -> str:
    """'pthreads' (default: helper threads of our own, created per call, never waited for unless they took work) or
    'openmp' (torch's OpenMP team). ``force`` switches, as DIM_SCAN_CPU_THREADING does at load time."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"scan_cpu kernel not available: {_load_error}")
    if force is not None:
        _set_threading(lib, force)
    return 'openmp' if lib.dim_scan_uses_openmp() else 'pthreads'


def isa(force: str | None = None) -> str:
    """The instruction-set variant in use: 'avx512' (16-lane vectors), 'avx2' (AVX2+FMA, 8 lanes) or 'generic' (the
    baseline ISA, 4 lanes: SSE2 on x86-64, NEON on aarch64). ``force`` selects one for the whole process (tests and
    benchmarks; a variant the CPU lacks gives the best supported one); 'auto' restores the default, the best one."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"scan_cpu kernel not available: {_load_error}")
    if force is not None:
        if force not in _ISA_CODES:
            raise ValueError(f"scan_cpu.isa: {force!r} is not one of {', '.join(_ISA_CODES)}")
        lib.dim_scan_force_isa(_ISA_CODES[force])
    return _ISA_NAMES[lib.dim_scan_active_isa()]


def kernel_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) exactly as the active variant evaluates exp(dt*A) for dt = x, A = 1 (testing aid)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"scan_cpu kernel not available: {_load_error}")
    x = x.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    lib.dim_scan_exp(_ptr(x), _ptr(y), x.numel())
    return y


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _check(rc, what):
    if rc == -1:
        raise MemoryError(f"scan_cpu {what}: out of memory")
    if rc != 0:
        raise RuntimeError(f"scan_cpu {what}: error {rc}")


def _prep(delta, u, A, B, C):
    for name, t in (("delta", delta), ("u", u), ("A", A), ("B", B), ("C", C)):
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise TypeError(f"scan_cpu: {name} must be a CPU float32 tensor, got {t.dtype} on {t.device}")
    if delta.dim() != 3 or u.shape != delta.shape:
        raise ValueError(f"scan_cpu: delta and u must be (batch, D, L), got {tuple(delta.shape)}, {tuple(u.shape)}")
    bsz, d, length = delta.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"scan_cpu: A must be (D, N) with D={d}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (bsz, n, length):
            raise ValueError(f"scan_cpu: {name} must be (batch, N, L) = {(bsz, n, length)}, got {tuple(t.shape)}")
    return (delta.contiguous(), u.contiguous(), A.contiguous(), B.contiguous(), C.contiguous()), (bsz, d, length, n)


def h0s_numel(bsz, d, length, n, segment):
    """Floats of the saved segment-start states (``dim_scan_h0s_numel`` of the C kernel, also for symbolic sizes):
    one 16 x 16 tile per (batch, 16-channel block, 16-state chunk, segment)."""
    if bsz <= 0 or d <= 0 or length <= 0 or n <= 0 or segment <= 0:
        return 0
    return bsz * ((d + 15) // 16) * ((n + 15) // 16) * ((length + segment - 1) // segment) * 256


# The kernel as torch.library ops, so that torch.compile traces through it (no graph break) and autograd is
# registered on the op.  Inputs are made contiguous inside; every output is a new contiguous float32 tensor.

@torch.library.custom_op("dim::cpu_scan_fwd", mutates_args=(), device_types="cpu")
def cpu_scan_fwd(delta: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 segment: int, save_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y (batch, D, L), last state (batch, D, N), saved segment states (h0s_numel,) or (0,)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"scan_cpu kernel not available: {_load_error}")
    (delta, u, A, B, C), (bsz, d, length, n) = _prep(delta, u, A, B, C)
    y = torch.empty(bsz, d, length, dtype=torch.float32)
    last = torch.empty(bsz, d, n, dtype=torch.float32)
    h0s = torch.empty(h0s_numel(bsz, d, length, n, segment) if save_states else 0, dtype=torch.float32)
    if min(bsz, d, length, n) == 0:
        y.zero_()
        last.zero_()
    else:
        rc = lib.dim_scan_fwd(_ptr(delta), _ptr(u), _ptr(A), _ptr(B), _ptr(C), _ptr(y), _ptr(last),
                              _ptr(h0s) if save_states else None, bsz, d, length, n, segment,
                              torch.get_num_threads())
        _check(rc, "forward")
    return y, last, h0s


@cpu_scan_fwd.register_fake
def _(delta, u, A, B, C, segment, save_states):
    _, (bsz, d, length, n) = _prep(delta, u, A, B, C)
    return (delta.new_empty(bsz, d, length), delta.new_empty(bsz, d, n),
            delta.new_empty(h0s_numel(bsz, d, length, n, segment) if save_states else 0))


@torch.library.custom_op("dim::cpu_scan_bwd", mutates_args=(), device_types="cpu")
def cpu_scan_bwd(delta: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 h0s: torch.Tensor, gy: torch.Tensor | None, glast: torch.Tensor | None, segment: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (delta, u, A, B, C) of the scan whose forward saved ``h0s``; gy / glast None mean zero."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"scan_cpu kernel not available: {_load_error}")
    (delta, u, A, B, C), (bsz, d, length, n) = _prep(delta, u, A, B, C)
    if h0s.numel() != h0s_numel(bsz, d, length, n, segment):
        raise ValueError("scan_cpu backward: h0s does not come from a forward with save_states=True and these shapes")
    grads = tuple(torch.empty(t.shape, dtype=torch.float32) for t in (delta, u, A, B, C))
    if gy is not None:
        gy = gy.to(torch.float32).contiguous()
    if glast is not None:
        glast = glast.to(torch.float32).contiguous()
    if min(bsz, d, length, n) == 0 or (gy is None and glast is None):
        for t in grads:
            t.zero_()
    else:
        rc = lib.dim_scan_bwd(_ptr(delta), _ptr(u), _ptr(A), _ptr(B), _ptr(C), _ptr(h0s.contiguous()), _ptr(gy),
                              _ptr(glast), *(_ptr(t) for t in grads), bsz, d, length, n, segment,
                              torch.get_num_threads())
        _check(rc, "backward")
    return grads


@cpu_scan_bwd.register_fake
def _(delta, u, A, B, C, h0s, gy, glast, segment):
    _prep(delta, u, A, B, C)
    return tuple(t.new_empty(t.shape) for t in (delta, u, A, B, C))


def _setup_context(ctx, inputs, output):
    delta, u, A, B, C, segment, save_states = inputs
    ctx.save_for_backward(delta, u, A, B, C, output[2])
    ctx.segment, ctx.saved_states = segment, save_states
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, gy, glast, _gh0s):
    delta, u, A, B, C, h0s = ctx.saved_tensors
    if not ctx.saved_states:                  # a forward that saved nothing: recompute the segment states
        h0s = cpu_scan_fwd(delta, u, A, B, C, ctx.segment, True)[2]
    grads = cpu_scan_bwd(delta, u, A, B, C, h0s, gy, glast, ctx.segment)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])) + (None, None)


cpu_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def scan_core(delta, u, A, B, C, return_last_state=False, *, segment: int | None = None):
    """Fused selective-scan core; see the module docstring. Returns ``(y, last_state or None)``."""
    if not torch.compiler.is_compiling() and _load() is None:
        raise RuntimeError(f"scan_cpu kernel not available: {_load_error}")
    (delta, u, A, B, C), _ = _prep(delta, u, A, B, C)
    segment = int(segment or SEGMENT)
    if segment < 1:
        raise ValueError("segment must be >= 1")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (delta, u, A, B, C))
    y, last, _ = cpu_scan_fwd(delta, u, A, B, C, segment, needs_grad)
    return y, (last if return_last_state else None)
