"""Test helper: counts, during a CPU run, what would make the host wait for the device in a GPU run.

On a GPU the host queues kernels ahead of the device; it stops and waits when it needs a value the device computes,
or copies memory in a way that waits for the device. On the CPU nothing waits, so `HostSyncCounter` counts the
calls that would, wherever they are made (our code, accelerate, torch):

- device-to-host reads of a device tensor: `Tensor.item`, `tolist`, `cpu`, `numpy`, `__bool__`, `__float__`,
  `__int__`, `__index__`, `__array__`, `__format__`, `__repr__` (Python level, patched on torch.Tensor), and, at the
  dispatcher (a TorchDispatchMode), `_local_scalar_dense` / `is_nonzero` made from C++ and the ops whose output
  size depends on device data (`nonzero`, `masked_select`, `unique`, `repeat_interleave` of a tensor,
  boolean-mask indexing);
- blocking copies of host data to the device: `Tensor.to(<device or tensor>)`, `Tensor.cuda()` and `Tensor.copy_`
  of a host tensor without `non_blocking=True`, `torch.tensor` / `torch.as_tensor` with a `device` of anything
  but a device tensor (also a device tensor's `.to('<string>')`, the way code writes a copy back to the host);
- barriers: `torch.distributed.barrier` / `monitored_barrier` and `Accelerator.wait_for_everyone`.

Which tensors are device tensors (in a GPU run) is followed through the dispatcher: `device_tensors()` (the
model's parameters, its EMA), every output of an op that has a device tensor among its inputs (activations,
gradients, optimizer moments...), tensors made by a torch factory (`torch.zeros`, `randn`, ...) with `device=` a
torch.device or a generator of `device_generators()` (the diffusion noise and timesteps), and the result of a
`.to(<device>)`; everything else is host memory (the loader's batches, draws from CPU generators, module
constants, Python data, tensors torch makes with `device='cpu'`). Reads of `host_tensors()` (torch AdamW's
per-parameter step counters, host memory in a GPU run too when it is not fused) are not counted, nor are reads of
host tensors and copies made inside torch's own code. A call inside another counted call counts once.

Limits, all on the side of counting less than a GPU run would do, none met by the training step: on the CPU a
`.to(device)` returns its input, which counts as a device tensor from then on (a host constant copied at every
step counts once); a device tensor's copy to the host written `.to(torch.device('cpu'))` is not told apart from a
no-op `.to(device)`; factories imported by name (`from torch import zeros`) are not followed.
"""
import os
import sys
import threading
import weakref

import accelerate
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ['HostSyncCounter', 'adamw_step_counters']

_READS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__', '__array__',
          '__format__', '__repr__')
_ATEN = torch.ops.aten
_DATA_DEPENDENT = {_ATEN.nonzero.default, _ATEN.masked_select.default, _ATEN._unique2.default,
                   _ATEN.unique_dim.default, _ATEN.unique_consecutive.default, _ATEN.repeat_interleave.Tensor,
                   _ATEN._local_scalar_dense.default, _ATEN.is_nonzero.default}
_INDEX_OPS = {_ATEN.index.Tensor, _ATEN.index_put.default, _ATEN.index_put_.default}
_FACTORIES = ('zeros', 'ones', 'full', 'empty', 'arange', 'linspace', 'eye', 'rand', 'randn', 'randint', 'randperm',
              'normal', 'zeros_like', 'ones_like', 'full_like', 'empty_like', 'rand_like', 'randn_like',
              'randint_like')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)


def adamw_step_counters(optimizer):
    """The host tensors of a non-fused torch AdamW: each parameter's `step` (CPU scalars, read with .item())."""
    inner = getattr(optimizer, 'optimizer', optimizer)
    return [s['step'] for s in inner.state.values() if 'step' in s and s['step'].device.type == 'cpu']


def _caller():
    """(file, line) of the first frame outside this module and the patched functions."""
    frame = sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == _HERE:
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ('?', 0)


class _Mode(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if not c.depth and c.counting:
            on_device = any(c.is_device(t) and not c.is_host(t) for t in tree_leaves((args, kwargs)))
            if on_device and func in _DATA_DEPENDENT:
                c.record(f'aten.{func.__name__}', _caller())
            elif on_device and func in _INDEX_OPS and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 else []) if i is not None):
                c.record(f'aten.{func.__name__} with a boolean mask', _caller())
        out = func(*args, **kwargs)
        if any(c.is_device(t) for t in tree_leaves((args, kwargs))):
            for t in tree_leaves(out):
                c.mark_device(t)
        return out


class HostSyncCounter:
    """Context manager recording `events` [(kind, (file, line), tag)] during its block (main thread only);
    `tag` is what `tag()` returned at the time (e.g. the training step)."""

    def __init__(self, device_tensors=lambda: (), host_tensors=lambda: (), device_generators=lambda: (),
                 tag=lambda: None):
        self.device_tensors, self.host_tensors, self.device_generators = device_tensors, host_tensors, device_generators
        self.tag, self.events, self.depth, self.counting = tag, [], 0, True
        self._thread = threading.get_ident()
        self._saved, self._device = [], {}

    def is_host(self, t):
        return isinstance(t, torch.Tensor) and any(t is h for h in self.host_tensors())

    def mark_device(self, t):
        if isinstance(t, torch.Tensor) and id(t) not in self._device:
            key = id(t)
            self._device[key] = weakref.ref(t, lambda _, key=key: self._device.pop(key, None))

    def is_device(self, t):
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def record(self, kind, where):
        if threading.get_ident() == self._thread:
            self.events.append((kind, where, self.tag()))

    def pause(self, fn):
        """`fn` with counting switched off while it runs (e.g. a checkpoint save)."""
        def paused(*args, **kwargs):
            before, self.counting = self.counting, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.counting = before
        return paused

    # ------------------------------------------------------------------ patching
    def _patch(self, owner, name, make):
        original = getattr(owner, name)
        self._saved.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, make(original))

    def _counted(self, kind, original, when=None, host_arg=True):
        """`original` recording `kind` when `when(*args)` holds (default: a read of a device tensor)."""
        counter = self
        if when is None:
            def when(t, *args, **kwargs):
                return counter.is_device(t)

        def wrapper(*args, **kwargs):
            if (counter.counting and not counter.depth and when(*args, **kwargs)
                    and not (host_arg and args and counter.is_host(args[0]))):
                counter.record(kind, _caller())
            counter.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter.depth -= 1
        return wrapper

    @staticmethod
    def _outside_torch():
        frame = sys._getframe(3)
        while frame is not None and os.path.abspath(frame.f_code.co_filename) == _HERE:
            frame = frame.f_back
        return frame is None or not frame.f_code.co_filename.startswith(_TORCH_DIR)

    def __enter__(self):
        for name in _READS:
            self._patch(torch.Tensor, name, lambda orig, name=name: self._counted(f'Tensor.{name}', orig))

        for t in self.device_tensors():
            self.mark_device(t)

        def target_of(args, kwargs):
            target = kwargs.get('device', args[0] if args else None)
            return target if isinstance(target, (torch.device, str, torch.Tensor)) or (
                isinstance(target, int) and not isinstance(target, bool)) else None

        def moves_blocking(t, *args, **kwargs):
            target = target_of(args, kwargs)
            if target is None or kwargs.get('non_blocking', False):
                return False
            if self.is_device(t):                          # a no-op on the device, or a copy back to the host
                return isinstance(target, str)
            return self._outside_torch()

        def moved(original):
            counted = self._counted('blocking Tensor.to', original, moves_blocking)

            def to(t, *args, **kwargs):
                out = counted(t, *args, **kwargs)
                if target_of(args, kwargs) is not None and not isinstance(target_of(args, kwargs), str):
                    self.mark_device(out)
                return out
            return to

        self._patch(torch.Tensor, 'to', moved)

        def made_on_device(original):
            def factory(*args, **kwargs):
                out = original(*args, **kwargs)
                generator = kwargs.get('generator')
                if isinstance(kwargs.get('device'), torch.device) or any(
                        generator is g for g in self.device_generators()):
                    self.mark_device(out)
                return out
            return factory

        for name in _FACTORIES:
            self._patch(torch, name, made_on_device)
        self._patch(torch.Tensor, 'cuda', lambda orig: self._counted(
            'blocking Tensor.cuda', orig, lambda t, *a, **k: not k.get('non_blocking', False) and not self.is_device(t)
            and self._outside_torch()))
        self._patch(torch.Tensor, 'copy_', lambda orig: self._counted(
            'blocking Tensor.copy_', orig, lambda t, src, non_blocking=False: not non_blocking
            and isinstance(src, torch.Tensor) and not self.is_device(src) and self.is_device(t)
            and self._outside_torch()))
        for name in ('tensor', 'as_tensor'):
            self._patch(torch, name, lambda orig, name=name: self._counted(
                f'torch.{name}(device=...)', orig, lambda data, *a, **k: k.get('device') is not None
                and not self.is_device(data) and self._outside_torch(), host_arg=False))
        for name in ('barrier', 'monitored_barrier'):
            self._patch(dist, name, lambda orig, name=name: self._counted(
                f'dist.{name}', orig, lambda *a, **k: True, host_arg=False))
        self._patch(accelerate.Accelerator, 'wait_for_everyone', lambda orig: self._counted(
            'Accelerator.wait_for_everyone', orig, lambda *a, **k: True, host_arg=False))
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for owner, name, original, own in reversed(self._saved):
            if own:
                setattr(owner, name, original)
            else:                                       # inherited (e.g. from torch._C.TensorBase)
                delattr(owner, name)
        self._saved = []
        return False
