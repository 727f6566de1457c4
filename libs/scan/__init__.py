"""`selective_scan`: mamba_ssm's `selective_scan_fn` semantics with automatic backend selection.

Backends, picked per call from the tensors' device (or forced with DIM_SCAN_BACKEND):
  cuda   mamba_ssm's fused CUDA kernel; CUDA tensors, when mamba_ssm is importable;
  cpu    our compiled CPU kernel (libs/scan/cpu.py); CPU tensors, when it was built at install;
  torch  our exact pure-PyTorch chunked scan (libs/scan/chunked.py); any device, always available.
DIM_SCAN_BACKEND=auto (default) | cuda | cpu | torch. The choice is logged once per backend.
"""
import functools
import logging
import os

import torch
import torch.nn.functional as F

from . import chunked as scan_chunked

__all__ = ['selective_scan', 'causal_conv1d', 'scan_backend']

BACKENDS = ('auto', 'cuda', 'cpu', 'torch')
_logged = set()


@functools.lru_cache(maxsize=None)
def _mamba_ssm():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn
    except Exception:  # ImportError, or a build that does not match this torch/CUDA
        return None


@functools.lru_cache(maxsize=None)
def _causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn
        return causal_conv1d_fn
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def _cpu_kernel():
    try:
        from . import cpu as scan_cpu
    except ImportError:
        return None
    return scan_cpu if scan_cpu.is_available() else None


def _requested():
    name = os.environ.get('DIM_SCAN_BACKEND', 'auto').strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"DIM_SCAN_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def scan_backend(device):
    """Name of the backend `selective_scan` uses for tensors on `device`."""
    device = torch.device(device)
    name = _requested()
    if name == 'auto':
        if device.type == 'cuda' and _mamba_ssm() is not None:
            name = 'cuda'
        elif device.type == 'cpu' and _cpu_kernel() is not None:
            name = 'cpu'
        else:
            name = 'torch'
    elif name == 'cuda' and (device.type != 'cuda' or _mamba_ssm() is None):
        raise RuntimeError("DIM_SCAN_BACKEND=cuda needs CUDA tensors and an importable mamba_ssm "
                           "(pip install -e '.[cuda]')")
    elif name == 'cpu' and (device.type != 'cpu' or _cpu_kernel() is None):
        raise RuntimeError("DIM_SCAN_BACKEND=cpu needs CPU tensors and the compiled kernel "
                           "(reinstall with `pip install -e .` on a machine with a C compiler)")
    if name not in _logged:
        _logged.add(name)
        logging.getLogger(__name__).info('selective scan backend: %s (device %s)', name, device)
    return name


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """out = (scan(u) + D*u) * silu(z), as mamba_ssm's `selective_scan_fn`.

    u, delta, z: (batch, Di, L); A: (Di, N) real; B, C: (batch, N, L); D, delta_bias: (Di,).
    Returns out (batch, Di, L) in u's dtype, and the last state (batch, Di, N) if asked.
    The scan is computed in fp32 whatever the input dtype.
    """
    if A.is_complex() or A.dim() != 2:
        raise ValueError(f"A must be a real (Di, N) tensor, got shape {tuple(A.shape)} dtype {A.dtype}")
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(f"B and C must be (batch, N, L), got {tuple(B.shape)} and {tuple(C.shape)}")
    if scan_backend(u.device) == 'cuda':
        return _mamba_ssm()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dtype = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    core = _cpu_kernel().scan_core if scan_backend(u.device) == 'cpu' else scan_chunked.scan_core
    y, last = core(delta, u, A.float(), B, C, return_last_state=return_last_state)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, last) if return_last_state else y


def causal_conv1d(x, weight, bias=None, activation=None):
    """Depthwise causal conv: x (batch, Di, L), weight (Di, K), bias (Di,) -> (batch, Di, L).

    out_t = bias + sum_k weight[:, k] * x_{t-K+1+k}, optionally followed by SiLU.
    """
    if activation not in (None, 'silu'):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    fn = _causal_conv1d() if x.is_cuda else None
    if fn is not None and _requested() in ('auto', 'cuda'):
        return fn(x.contiguous(), weight.contiguous(), bias, activation)
    K = weight.shape[-1]
    out = F.conv1d(F.pad(x, (K - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation == 'silu' else out
