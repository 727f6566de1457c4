"""`selective_scan`: mamba-ssm's `selective_scan_fn` semantics, one dispatcher over every backend.

Backends (DIM_SCAN_BACKEND = auto (default) | mamba_ssm | triton | cpu | torch):
  mamba_ssm  mamba-ssm's fused CUDA kernel (libs/scan/cuda_ext.py); CUDA tensors.
  triton     our Triton kernel (libs/scan/triton_scan.py); CUDA tensors (ROCm builds of torch too), or CPU tensors
             under TRITON_INTERPRET=1 (Triton's interpreter: tests only, slow).
  cpu        our compiled C kernel (libs/scan/cpu.py); CPU tensors, when it was built at install.
  torch      our exact pure-PyTorch chunked scan (libs/scan/chunked.py); any device, always available, slow on GPUs.
auto: CUDA tensors get mamba_ssm when its kernel runs, else triton, else torch with a WARNING (mamba-ssm's fused
kernel first until a card shows the Triton scan is faster: its sm_90 code is only estimated, docs/triton-scan.md);
CPU tensors get cpu, else torch with a WARNING; other devices get torch. A kernel counts only once it has run: one
tiny forward + backward per device, compared with the torch backend (an importable mamba-ssm may have no Mamba-1
kernel). A forced backend that cannot run is an error that says how to fix it. Each choice is logged once per
device.

The depthwise causal conv uses causal-conv1d's kernel when the scan backend is mamba_ssm and that kernel runs, else
torch's conv1d.

Under torch.compile the choice is made once, eagerly, while the graph is traced (`assume_constant_result`): set
DIM_SCAN_BACKEND before compiling. The cpu (and triton) backends are torch.library ops: no graph break.
"""
import importlib
import logging
import os

import torch
import torch.nn.functional as F

from . import chunked as scan_chunked
from . import cpu as scan_cpu
from . import cuda_ext

__all__ = ['selective_scan', 'causal_conv1d', 'scan_backend', 'conv_backend', 'BACKENDS']

BACKENDS = ('auto', 'mamba_ssm', 'triton', 'cpu', 'torch')
SLOW_COST = ("estimate: ~25x the memory traffic of a fused kernel (it steps (batch, Di, chunks, N) states through "
             "memory), and its backward keeps the chunk states")
log = logging.getLogger(__name__)

_choices = {}       # (DIM_SCAN_BACKEND, device) -> scan backend
_conv_choices = {}  # (DIM_SCAN_BACKEND, device) -> 'causal_conv1d' | 'torch'
_probes = {}        # (kernel, device) -> None (it runs) or why not


def _device_type(device):
    """'cuda' (NVIDIA, and AMD on ROCm builds of torch), 'cpu', or another torch device type."""
    return torch.device(device).type


def requested_backend():
    """DIM_SCAN_BACKEND, validated."""
    name = os.environ.get('DIM_SCAN_BACKEND', 'auto').strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"DIM_SCAN_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def _triton():
    return importlib.import_module(__name__ + '.triton_scan')


def _platform(device):
    return f"{device} (ROCm {torch.version.hip})" if _device_type(device) == 'cuda' and torch.version.hip else device


# ----------------------------------------------------------------------------------------------------------------
# Probes: does a kernel run on this device and agree with the torch backend?
# ----------------------------------------------------------------------------------------------------------------

SCAN_ARGS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


class _Unavailable(Exception):
    """A kernel's own account of why it cannot run."""


def _probe_case(kind):
    """(kernel call, reference call, CPU inputs) of one tiny problem for kernel `kind`; the calls take the inputs
    positionally."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    if kind == 'causal_conv1d':
        fn = cuda_ext.causal_conv1d_fn()
        return (lambda *a: cuda_ext.causal_conv1d(fn, *a, activation='silu'),
                lambda *a: _torch_causal_conv1d(*a, activation='silu'), [r(2, 8, 7), r(8, 3), r(8)])
    if kind == 'mamba_ssm':
        fn = cuda_ext.selective_scan_fn()
        call = lambda **a: cuda_ext.selective_scan(fn, **a)
    else:
        module = _triton()
        if not module.is_available():
            raise _Unavailable(module.unavailable_reason() or 'triton_scan.is_available() is False')
        call = module.selective_scan
    inputs = [r(2, 4, 9), r(2, 4, 9) * 0.5, -torch.rand(4, 3, generator=g) - 0.5, r(2, 3, 9), r(2, 3, 9), r(4),
              r(2, 4, 9), r(4) * 0.1 - 1]
    by_name = lambda f: lambda *a: f(**dict(zip(SCAN_ARGS, a)), delta_softplus=True)
    return by_name(call), by_name(lambda **a: _scan_with_core(scan_chunked.scan_core, **a)), inputs


def _close(ours, ref, tol=1e-3):
    """Every tensor of `ours` within `tol` of `ref`, relative to the reference's largest entry."""
    return all(a is not None and a.shape == b.shape and bool((a.detach().cpu().double() - b.double()).abs().max()
                                                             <= tol * b.abs().max().double().clamp_min(1e-6))
               for a, b in zip(ours, ref))


def _run_probe(kind, device):
    """None when kernel `kind` ('mamba_ssm', 'triton', 'causal_conv1d') runs on `device`, else the reason: a tiny
    forward and backward, compared with our torch implementation on CPU."""
    try:
        run, reference, inputs = _probe_case(kind)
        ours = [t.to(device).requires_grad_() for t in inputs]
        refs = [t.clone().requires_grad_() for t in inputs]
        out, expected = run(*ours), reference(*refs)
        gout = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((out.float() * gout.to(out.device)).sum(), ours)
        ref_grads = torch.autograd.grad((expected * gout).sum(), refs)
        if _device_type(device) == 'cuda' and torch.cuda.is_available():
            torch.cuda.synchronize(device)
        if not _close([out], [expected]) or not _close(grads, ref_grads):
            return f"its results on {device} disagree with the torch backend (probe of a 2x4x9 problem)"
        return None
    except _Unavailable as e:
        return str(e)
    except Exception as e:  # the reason is the message: import failure, kernel not built, wrong device, ...
        return f"{type(e).__name__}: {e}".strip()


def _probe(kind, device):
    key = (kind, device)
    if key not in _probes:
        # isolated from the caller's context: no_grad / inference mode (sampling), autocast, and the saved-tensor
        # hooks of an activation checkpoint around the first call
        no_autocast = torch.autocast(torch.device(device).type, enabled=False)
        with torch.inference_mode(False), torch.enable_grad(), no_autocast, \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            _probes[key] = _run_probe(kind, device)
    return _probes[key]


# ----------------------------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------------------------

FIX = {
    'mamba_ssm': "install mamba-ssm with its Mamba-1 CUDA kernel (README: optional CUDA kernels; "
                 "MAMBA_KEEP_CUDA_BUILD=TRUE pip install --no-build-isolation mamba-ssm)",
    'triton': "use a PyTorch CUDA or ROCm wheel, which ships Triton (pip install torch triton); "
              "on CPU tensors Triton runs only under TRITON_INTERPRET=1",
    'cpu': "reinstall on a machine with a C compiler: pip install -e .",
}


AUTO_ORDER = {'cuda': ('mamba_ssm', 'triton'), 'cpu': ('cpu',)}    # fused kernels auto tries, by device type


def _unusable(name, device):
    """None when backend `name` can run on `device`, else why not."""
    kind = _device_type(device)
    if name == 'torch':
        return None
    if name == 'cpu':
        if kind != 'cpu':
            return f"the C kernel takes CPU tensors, not {kind}"
        return None if scan_cpu.is_available() else scan_cpu.unavailable_reason()
    if name == 'mamba_ssm' and kind != 'cuda':
        return f"mamba-ssm's kernel takes CUDA tensors, not {kind}"
    if name == 'triton' and kind not in ('cuda', 'cpu'):
        return f"the Triton kernel takes CUDA tensors, not {kind}"
    if name == 'triton' and kind == 'cpu' and os.environ.get('TRITON_INTERPRET', '0') in ('', '0'):
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (its interpreter: tests, slow)"
    return _probe(name, device)


def _choose(requested, device):
    kind = _device_type(device)
    if requested != 'auto':
        why_not = _unusable(requested, device)
        if why_not is not None:
            raise RuntimeError(f"DIM_SCAN_BACKEND={requested} cannot run on {device}: {why_not}. "
                               f"Fix: {FIX[requested]}, or unset DIM_SCAN_BACKEND")
        name, how = requested, f'forced by DIM_SCAN_BACKEND={requested}'
    else:
        reasons = {}
        for name in AUTO_ORDER.get(kind, ()):
            reasons[name] = _unusable(name, device)
            if reasons[name] is None:
                break
        else:
            name = 'torch'
        how = 'auto' + ''.join(f'; {k} not usable: {v}' for k, v in reasons.items() if v is not None)
    if name == 'torch' and kind in ('cuda', 'cpu'):
        fix = 'unset DIM_SCAN_BACKEND' if requested == 'torch' else '; or '.join(FIX[k] for k in AUTO_ORDER[kind])
        log.warning("selective scan on %s: backend 'torch', the pure-PyTorch chunked scan (%s): slow, %s. Fix: %s",
                    _platform(device), how, SLOW_COST, fix)
    else:
        log.info('selective scan on %s: backend %r (%s)', _platform(device), name, how)
    return name


@torch.compiler.assume_constant_result
def scan_backend(device):
    """Name of the backend `selective_scan` uses for tensors on `device` (chosen, probed and logged once)."""
    device = str(torch.device(device))
    key = (requested_backend(), device)
    if key not in _choices:
        _choices[key] = _choose(key[0], device)
    return _choices[key]


@torch.compiler.assume_constant_result
def conv_backend(device):
    """'causal_conv1d' (causal-conv1d's kernel, with the mamba_ssm scan backend when it runs) or 'torch'."""
    device = str(torch.device(device))
    key = (requested_backend(), device)
    if key not in _conv_choices:
        name = 'torch'
        if scan_backend(device) == 'mamba_ssm':
            why_not = _probe('causal_conv1d', device)
            name = 'causal_conv1d' if why_not is None else 'torch'
            log.info('causal conv on %s: %s', device, 'causal-conv1d' if why_not is None
                     else f"torch conv1d (causal-conv1d not usable: {why_not})")
        _conv_choices[key] = name
    return _conv_choices[key]


def reset():
    """Forget every choice and probe (tests; after installing a kernel in a running process)."""
    _choices.clear()
    _conv_choices.clear()
    _probes.clear()


# ----------------------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------------------

def _scan_with_core(core, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
    """Full semantics around a core (delta, u, A, B, C) -> (y, last) that scans in fp32."""
    dtype = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y, last = core(delta, u, A.float(), B, C, return_last_state=return_last_state)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, last) if return_last_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """out = (scan(u) + D*u) * silu(z), as mamba-ssm's `selective_scan_fn`.

    u, delta, z: (batch, Di, L); A: (Di, N) real; B, C: (batch, N, L); D, delta_bias: (Di,).
    Returns out (batch, Di, L) in u's dtype, and the last state (batch, Di, N) fp32 if asked.
    The scan is computed in fp32 whatever the input dtype.
    """
    if A.is_complex() or A.dim() != 2:
        raise ValueError(f"A must be a real (Di, N) tensor, got shape {tuple(A.shape)} dtype {A.dtype}")
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(f"B and C must be (batch, N, L), got {tuple(B.shape)} and {tuple(C.shape)}")
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, return_last_state=return_last_state)
    name = scan_backend(str(u.device))
    if name == 'mamba_ssm':
        return cuda_ext.selective_scan(cuda_ext.selective_scan_fn(), u, delta, A, B, C, **kwargs)
    if name == 'triton':
        return _triton().selective_scan(u=u, delta=delta, A=A, B=B, C=C, **kwargs)
    core = scan_cpu.scan_core if name == 'cpu' else scan_chunked.scan_core
    return _scan_with_core(core, u, delta, A, B, C, **kwargs)


def _torch_causal_conv1d(x, weight, bias=None, activation=None):
    K = weight.shape[-1]
    xp = F.pad(x, (K - 1, 0))
    if torch.compiler.is_compiling():
        # As a K-tap windowed sum, which Inductor fuses with the SiLU and the layout change into one kernel (on CPU,
        # Di 512, L 1230: ~4x faster than conv1d's extern kernel on the mixer's channel-last x). Same dtype as conv1d.
        device = x.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(x.dtype, weight.dtype))
        out = (xp.float().unfold(-1, K, 1) * weight.float()[:, None, :]).sum(-1)
        out = (out if bias is None else out + bias.float()[:, None]).to(dtype)
    else:
        out = F.conv1d(xp, weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation == 'silu' else out


def causal_conv1d(x, weight, bias=None, activation=None):
    """Depthwise causal conv: x (batch, Di, L), weight (Di, K), bias (Di,) -> (batch, Di, L).

    out_t = bias + sum_k weight[:, k] * x_{t-K+1+k}, optionally followed by SiLU.
    """
    if activation not in (None, 'silu'):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if conv_backend(str(x.device)) == 'causal_conv1d':
        return cuda_ext.causal_conv1d(cuda_ext.causal_conv1d_fn(), x, weight, bias, activation=activation)
    return _torch_causal_conv1d(x, weight, bias, activation)
