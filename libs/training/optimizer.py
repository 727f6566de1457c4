"""Optimiser, learning-rate schedule and EMA, as the official training (dim-pipeline.md §2)."""
import copy

import torch

__all__ = ['make_optimizer', 'make_lr_scheduler', 'make_ema', 'ema_update', 'ema_lerp_']


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


def make_ema(model):
    """An fp32 copy of `model` in eval mode, without gradients."""
    ema = copy.deepcopy(model).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_lerp_(ema_tensors, tensors, decay=0.9999):
    """In place: e <- decay * e + (1 - decay) * t for matching lists of fp32 tensors (any sharding, same shapes)."""
    torch._foreach_lerp_(list(ema_tensors), [t.detach().float() for t in tensors], 1.0 - decay)


@torch.no_grad()
def ema_update(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, parameters only (the model has no buffers)."""
    ema_lerp_(ema.parameters(), model.parameters(), decay)
