"""The optional CUDA kernels of Dao-AILab: mamba-ssm's selective scan and causal-conv1d's depthwise causal conv.

Both are imported lazily and called by keyword, against the signatures of mamba-ssm 2.3.2 and causal-conv1d 1.7.0:

    selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False)
    causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None)

and their inputs are prepared for the kernels' rules:
  selective scan: u, delta, z and B, C (batch, N, L) share one dtype (fp32, fp16 or bf16); A (Di, N), D and
    delta_bias fp32; out has that shared dtype; last_state (batch, Di, N) fp32 and not differentiable (the
    kernel's backward ignores its gradient);
  causal conv: x (batch, Di, L) fp32/fp16/bf16 with stride(2) == 1 (the channel-last alternative, stride(1) == 1,
    also needs Di % 8 == 0 and 8-aligned strides); weight (Di, K), 2 <= K <= 4, and bias share a dtype (fp32,
    fp16 or bf16; it may differ from x's); out has x's dtype and layout.
Whether a kernel actually runs on a device is probed by the dispatcher (libs/scan/__init__.py), not here: an
importable module is not a working kernel (mamba-ssm after 2.3.2 builds its Mamba-1 scan only on request).
"""
import torch

__all__ = ['selective_scan_fn', 'causal_conv1d_fn', 'selective_scan', 'causal_conv1d', 'KERNEL_DTYPES']

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def selective_scan_fn():
    """mamba-ssm's `selective_scan_fn`. Raises ImportError saying why it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
    except Exception as e:  # ImportError, or a build that does not match this torch / CUDA (OSError, ...)
        raise ImportError(f"mamba_ssm.ops.selective_scan_interface.selective_scan_fn: {type(e).__name__}: {e}") from e
    return fn


def causal_conv1d_fn():
    """causal-conv1d's `causal_conv1d_fn`. Raises ImportError saying why it cannot be imported."""
    try:
        from causal_conv1d import causal_conv1d_fn as fn
    except Exception as e:
        raise ImportError(f"causal_conv1d.causal_conv1d_fn: {type(e).__name__}: {e}") from e
    return fn


def selective_scan(fn, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """`fn` (mamba-ssm's selective_scan_fn) with our `selective_scan` contract: out in u's dtype.

    u, delta, z: (batch, Di, L); A: (Di, N); B, C: (batch, N, L); D, delta_bias: (Di,).
    """
    if return_last_state and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)):
        raise ValueError("mamba-ssm's selective_scan_fn drops the gradient of last_state; with return_last_state "
                         "and gradients, use DIM_SCAN_BACKEND=triton, cpu or torch")
    io = u.dtype if u.dtype in KERNEL_DTYPES else torch.float32
    out = fn(u=u.to(io), delta=delta.to(io), A=A.float(), B=B.to(io), C=C.to(io),
             D=None if D is None else D.float(), z=None if z is None else z.to(io),
             delta_bias=None if delta_bias is None else delta_bias.float(),
             delta_softplus=bool(delta_softplus), return_last_state=bool(return_last_state))
    if return_last_state:
        y, last = out
        return y.to(u.dtype), last.float()
    return out.to(u.dtype)


def causal_conv1d(fn, x, weight, bias=None, activation=None):
    """`fn` (causal-conv1d's causal_conv1d_fn): x (batch, Di, L), weight (Di, K), bias (Di,) -> (batch, Di, L)."""
    if x.dtype not in KERNEL_DTYPES:
        x = x.float()
    if x.stride(2) != 1:
        x = x.contiguous()
    wdtype = weight.dtype if weight.dtype in KERNEL_DTYPES else torch.float32
    weight = weight.to(wdtype)
    if bias is not None:
        bias = bias.to(wdtype).contiguous()
    return fn(x=x, weight=weight, bias=bias, activation=activation)
