"""The EMA of the trained weights, kept with the parameters' sharding and gathered only to save or sample.

ema <- decay * ema + (1 - decay) * weights after every optimiser step (parameters only, fp32, as the official
training). Unsharded (one process, DDP) the EMA is a module, an fp32 copy of the network, used as is for sampling.
Sharded (FSDP, ZeRO-2) each process keeps fp32 copies of its own parts only (`ParamLayout.local_tensors()`, the
fp32 masters under ZeRO-2), so an update is a local lerp with no communication and 1/W of the memory; the full
weights are assembled for a checkpoint (`full_state_dict`) or a sampling module (`module`).
"""
import copy

import torch

__all__ = ['EMA', 'make_ema', 'ema_lerp_', 'ema_update']


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


class EMA:
    """EMA over `layout` (libs.training.sharding.ParamLayout). Unsharded: `module` is the EMA network (an fp32 copy
    made with `make_ema` before accelerate wraps the model). Sharded: `build_model()` makes a network of the same
    config (built on the meta device) for the sampling module."""

    def __init__(self, layout, module=None, build_model=None):
        self.layout = layout
        if layout.sharded:
            self._module, self._build = None, build_model
            self.tensors = [t.detach().float().clone() for t in layout.local_tensors()]
        else:
            self._module = module
            params = dict(module.named_parameters())
            self.tensors = [params[n] for n in layout.names]

    def update(self, decay):
        ema_lerp_(self.tensors, self.layout.local_tensors(), decay)

    def full_state_dict(self, dst=0):
        """{name: fp32 CPU tensor} in the released key layout on rank `dst` (None: all); None elsewhere. Collective."""
        return self.layout.gather_full(self.tensors, dst)

    @torch.no_grad()
    def load_full_state_dict(self, state):
        """Take this process's parts from a full state dict (e.g. a memory-mapped nnet_ema.pth)."""
        if set(state) != set(self.layout.names):
            raise ValueError(f"EMA state keys differ from the model's: {sorted(set(state) ^ set(self.layout.names))[:5]}")
        for k, name in enumerate(self.layout.names):
            self.tensors[k].copy_(self.layout.take_local(k, state[name]))

    def module(self, dst=0):
        """The EMA network for sampling, in eval mode, on rank `dst` (None: every rank); None elsewhere. Collective
        when sharded (the weights are gathered anew)."""
        if self._module is not None:
            return self._module if dst is None or dst == self.layout.rank else None
        state = self.full_state_dict(dst)
        if state is None:
            return None
        with torch.device('meta'):
            net = self._build()
        net.load_state_dict(state, assign=True)
        return net.to(self.layout.device).eval().requires_grad_(False)
