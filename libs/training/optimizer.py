"""The optimiser and learning-rate schedule of the official training (docs/architecture.md §15), and the
optimizer state as plain tensors and numbers for the checkpoints, per sharding kind:

  replicated  the AdamW state_dict, identical on every process (saved once, as the released optimizer.pth).
  fsdp1       this process's AdamW state_dict over its parameter slices (already plain).
  fsdp2       this process's AdamW state_dict with every DTensor replaced by its local tensor; on load the local
              tensors are wrapped again with their parameter's mesh and placements.
  zero2       this process's DeepSpeed ZeRO optimizer state_dict (fp32 master partition, AdamW state of it) with its
              Python objects made plain: the LossScaler as its attributes, the stage enum as an int, the parameter
              slice mappings as [start, numel] lists. On load the fp32 masters are taken from it (not re-derived
              from the bf16 weights), so the run continues bit-exactly.
Plain state loads with `torch.load(weights_only=True)`.
"""
import collections

import torch

__all__ = ['make_optimizer', 'make_lr_scheduler', 'optimizer_state', 'load_optimizer_state']


def make_optimizer(params, name='adamw', lr=2e-4, weight_decay=0.03, betas=(0.9, 0.999), eps=1e-8, fused=True):
    """AdamW over one parameter group (every parameter decayed, as the official code).

    fused: torch's fused AdamW kernel (a few launches per step instead of several per parameter) when every
    parameter is on a CUDA device; elsewhere (CPU runs) torch's default implementation, as with fused=False.
    """
    if name != 'adamw':
        raise ValueError(f"config.optimizer.name={name!r} is not supported (only 'adamw')")
    if not isinstance(fused, bool):
        raise ValueError(f"config.optimizer.fused={fused!r}: expected True or False")
    params = list(params)
    on_cuda = bool(params) and all(p.device.type == 'cuda' for p in params)
    # fused=None, not False, for the default: torch then still picks its multi-tensor kernels on CUDA
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                             fused=True if fused and on_cuda else None)


def _warmup_factor(warmup_steps):
    def factor(step):
        return max(0.0, min(step / warmup_steps, 1.0)) if warmup_steps > 0 else 1.0
    return factor


def make_lr_scheduler(optimizer, name='customized', warmup_steps=0):
    """'customized': linear warm-up over `warmup_steps` optimiser steps, then constant (step 1 runs at lr 0)."""
    if name != 'customized':
        raise ValueError(f"config.lr_scheduler.name={name!r} is not supported (only 'customized')")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(warmup_steps))


_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def _torch_optimizer(optimizer):
    return getattr(optimizer, 'optimizer', optimizer)       # accelerate's wrapper -> the optimizer it wraps


def _ordered_params(opt):
    return [p for group in opt.param_groups for p in group['params']]


def optimizer_state(kind, optimizer):
    """This process's optimizer state (the full one when replicated), plain."""
    inner = _torch_optimizer(optimizer)
    if kind == 'zero2':
        return _zero_plain(inner.state_dict())
    state = inner.state_dict()
    if kind == 'fsdp2':
        from torch.distributed.tensor import DTensor
        state = {**state, 'state': {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                                    for i, s in state['state'].items()}}
    return state


def load_optimizer_state(kind, optimizer, state, rank=0, world_size=1):
    """Restore what `optimizer_state(kind, ...)` returned (this process's part)."""
    inner = _torch_optimizer(optimizer)
    if kind == 'zero2':
        sd = _zero_objects(inner, state)
        inner.load_state_dict([sd if r == rank else None for r in range(world_size)],
                              load_optimizer_states=True, load_from_fp32_weights=True)
        return
    if kind == 'fsdp2':
        from torch.distributed.tensor import DTensor
        params = _ordered_params(inner)

        def wrap(p, v):
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.to_local().shape and v.dim() > 0:
                return DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())
            return v
        state = {**state, 'state': {i: {k: wrap(params[int(i)], v) for k, v in s.items()}
                                    for i, s in state['state'].items()}}
    optimizer.load_state_dict(state)


def _zero_plain(sd):
    out = dict(sd)
    scaler = out.pop('loss_scaler')
    out['loss_scaler'] = {k: v for k, v in vars(scaler).items() if isinstance(v, _PLAIN)}
    out['zero_stage'] = int(out['zero_stage'])
    if 'param_slice_mappings' in out:
        out['param_slice_mappings'] = [{name: [int(a.start), int(a.numel)] for name, a in group.items()}
                                       for group in out['param_slice_mappings']]
    return out


def _zero_objects(inner, state):
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    sd = dict(state)
    scaler = inner.loss_scaler                  # the live scaler object, with the saved attributes put back
    for k, v in state['loss_scaler'].items():
        setattr(scaler, k, v)
    sd['loss_scaler'] = scaler
    sd['zero_stage'] = ZeroStageEnum(state['zero_stage'])
    if 'param_slice_mappings' in sd:
        sd['param_slice_mappings'] = [collections.OrderedDict((n, fragment_address(start=s, numel=m))
                                                              for n, (s, m) in group.items())
                                      for group in state['param_slice_mappings']]
    return sd
