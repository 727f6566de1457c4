"""CPU stand-ins for mamba-ssm 2.3.2.post1's `selective_scan_fn` and causal-conv1d 1.7.0's `causal_conv1d_fn`.

Same signatures, semantics and input rules as the real functions (read from their sources:
mamba_ssm/ops/selective_scan_interface.py + csrc/selective_scan/selective_scan.cpp, causal_conv1d/
causal_conv1d_interface.py + csrc/causal_conv1d.cpp): the Python wrappers' contiguity fixes, then the kernels'
dtype / shape / stride checks, raised as the RuntimeError a failed TORCH_CHECK gives. Only `is_cuda` is not
checked: the tests run them on CPU. The math is the tests' own (reference_ops.sequential_scan, a windowed sum).
`install(monkeypatch)` puts them into sys.modules under the real module names.
"""
import sys
import types

import torch
import torch.nn.functional as F

from reference_ops import sequential_scan

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
calls = []          # (function name, kwargs names) of every call, for the tests


def _check(cond, what):
    if not cond:
        raise RuntimeError(f"Expected {what} to be true, but got false.")


class _SelectiveScan(torch.autograd.Function):
    """fp32 reference scan; like the kernel: out in the input dtype, last state fp32, its gradient ignored."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        f = lambda t: None if t is None else t.float()
        out, last = sequential_scan(f(u), f(delta), A, f(B), f(C), D, f(z), delta_bias, delta_softplus)
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, _dlast):
        saved = ctx.saved_tensors
        leaves = [None if t is None else t.detach().float().requires_grad_() for t in saved]
        with torch.enable_grad():
            out, _ = sequential_scan(*leaves, ctx.delta_softplus)
            present = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(out, present, dout.float(), allow_unused=True))
        return tuple(None if t is None else next(grads) for t in leaves) + (None,)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    calls.append('selective_scan_fn')
    # the Python wrapper
    u = u if u.stride(-1) == 1 else u.contiguous()
    delta = delta if delta.stride(-1) == 1 else delta.contiguous()
    D = None if D is None else D.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    # the kernel (real A, variable B and C of shape (batch, N, L), i.e. one group)
    _check(u.dtype in KERNEL_DTYPES, 'input_type == Float || input_type == Half || input_type == BFloat16')
    _check(A.dtype == torch.float32, 'weight_type == Float || weight_type == ComplexFloat')
    _check(delta.dtype == u.dtype, 'delta.scalar_type() == input_type')
    _check(B.dtype == u.dtype and C.dtype == u.dtype, 'B/C.scalar_type() == input_type')
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    _check(dstate <= 256, 'dstate <= 256')
    _check(delta.shape == (batch, dim, seqlen), 'delta of shape (batch_size, dim, seqlen)')
    _check(A.shape == (dim, dstate), 'A of shape (dim, dstate)')
    _check(B.shape == (batch, dstate, seqlen) and C.shape == (batch, dstate, seqlen), 'B/C of shape (b, n, l)')
    if D is not None:
        _check(D.dtype == torch.float32 and D.shape == (dim,), 'D fp32 of shape (dim)')
    if delta_bias is not None:
        _check(delta_bias.dtype == torch.float32 and delta_bias.shape == (dim,), 'delta_bias fp32 of shape (dim)')
    if z is not None:
        _check(z.dtype == u.dtype and z.shape == u.shape, 'z.scalar_type() == input_type')
    out, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    calls.append('causal_conv1d_fn')
    # the Python wrapper
    if activation not in [None, "silu", "swish"]:
        raise NotImplementedError("activation must be None, silu, or swish")
    if x.stride(2) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if seq_idx is not None:
        assert not return_final_states, "If seq_idx is not None, we don't return final_states_out"
    seq_idx = seq_idx.contiguous() if seq_idx is not None else None
    if initial_states is not None and initial_states.stride(2) != 1 and initial_states.stride(1) != 1:
        initial_states = initial_states.contiguous()
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if return_final_states:
        assert x.stride(1) == 1, "Only channel-last layout support returning final_states_out"
        if final_states_out is None:
            final_states_out = torch.empty(batch, width - 1, dim, dtype=x.dtype).transpose(1, 2)
    else:
        final_states_out = None
    # the kernel
    _check(x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES, 'input/weight type Float, Half or BFloat16')
    _check(weight.shape == (dim, width), 'weight of shape (dim, width)')
    _check(x.stride(2) == 1 or x.stride(1) == 1, 'x.stride(2) == 1 || x.stride(1) == 1')
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        _check(dim % 8 == 0, 'dim % 8 == 0 (channel last)')
        _check(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, 'x.stride(0), x.stride(2) multiples of 8')
    _check(2 <= width <= 4, 'width between 2 and 4')
    if bias is not None:
        _check(bias.dtype == weight.dtype and bias.stride(-1) == 1 and bias.shape == (dim,), 'bias of weight type')
    if seq_idx is not None:
        _check(channel_last and seq_idx.dtype == torch.int32 and seq_idx.shape == (batch, seqlen), 'seq_idx int32')
    if initial_states is not None:
        _check(channel_last and initial_states.dtype == x.dtype and initial_states.stride(1) == 1
               and initial_states.shape == (batch, dim, width - 1), 'initial_states channel last, x dtype')
    if final_states_out is not None:
        _check(channel_last and final_states_out.dtype == x.dtype and final_states_out.stride(1) == 1
               and final_states_out.shape == (batch, dim, width - 1), 'final_states channel last, x dtype')
    # the math, in fp32: out_t = bias + sum_k w_k x_{t-K+1+k}, taps before the sequence start (or in another
    # sequence of seq_idx) are the initial states (or zero)
    head = x.new_zeros(batch, dim, width - 1) if initial_states is None else initial_states
    xs = torch.cat([head, x], dim=-1).float()
    windows = xs.unfold(-1, width, 1)                                      # (batch, dim, seqlen, width)
    if seq_idx is not None:
        ids = torch.cat([seq_idx[:, :1].expand(-1, width - 1) if initial_states is not None
                         else seq_idx.new_full((batch, width - 1), -1), seq_idx], dim=-1).unfold(-1, width, 1)
        windows = windows * (ids == seq_idx.unsqueeze(-1)).unsqueeze(1)
    y = (windows * weight.float()[None, :, None]).sum(-1)
    if bias is not None:
        y = y + bias.float()[None, :, None]
    if activation is not None:
        y = F.silu(y)
    if seq_idx is not None:
        y = y.masked_fill((seq_idx < 0).unsqueeze(1), 0.0)
    out = torch.empty_like(x)
    out.copy_(y)
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(xs[..., -(width - 1):])
        return out, final_states_out
    return out


def failing_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              return_last_state=False):
    """What mamba-ssm after 2.3.2 does when built without MAMBA_KEEP_CUDA_BUILD=TRUE: the import works, the call
    fails."""
    raise RuntimeError("selective_scan_cuda is not available: the Mamba-1 CUDA kernel was not built "
                       "(reinstall with MAMBA_KEEP_CUDA_BUILD=TRUE)")


def install(monkeypatch, scan=selective_scan_fn, conv=causal_conv1d_fn):
    """Put the stand-ins into sys.modules as mamba_ssm(.ops.selective_scan_interface) and causal_conv1d."""
    mods = {name: types.ModuleType(name) for name in
            ('mamba_ssm', 'mamba_ssm.ops', 'mamba_ssm.ops.selective_scan_interface', 'causal_conv1d')}
    mods['mamba_ssm.ops.selective_scan_interface'].selective_scan_fn = scan
    mods['mamba_ssm'].ops = mods['mamba_ssm.ops']
    mods['mamba_ssm.ops'].selective_scan_interface = mods['mamba_ssm.ops.selective_scan_interface']
    mods['mamba_ssm'].selective_scan_fn = scan
    mods['causal_conv1d'].causal_conv1d_fn = conv
    for name, mod in mods.items():
        if scan is None and name.startswith('mamba_ssm') or conv is None and name == 'causal_conv1d':
            monkeypatch.setitem(sys.modules, name, None)            # import raises ImportError
        else:
            monkeypatch.setitem(sys.modules, name, mod)
    calls.clear()
