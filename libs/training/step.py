"""One optimiser step: gradient_accumulation_steps micro-batches of the diffusion loss, clipping, the optimiser, the
LR schedule and the EMA update; and the per-step values, kept on the device between two reads.

The step returns its values as device tensors (the loss averaged over every process and micro-batch, the gradient
norm before clipping, or None where the launch does not report it) and reads nothing back: a step makes no
device-to-host transfer, no blocking host-to-device copy and no barrier, so the host can queue the next step while
the device computes. `StepValues` collects them and reads them back in one transfer when the trainer asks (log
intervals, and before a checkpoint or an evaluation), stopping at the first non-finite loss with its step.
"""
import math
import time

import torch

import sde
from libs.training.launch import forward_autocast

__all__ = ['TrainStep', 'StepValues']


class TrainStep:
    """`step(batches) -> (loss, grad_norm)` for TrainState `state` and TrainData `data`."""

    def __init__(self, config, acc, state, data):
        self.acc, self.state, self.data = acc, state, data
        self.max_norm = config.get('max_grad_norm') or float('inf')
        self.decay = config.train.get('ema_rate', 0.9999)
        self.autocast = forward_autocast(acc)
        self.data_fingerprint = None            # sum of this process's first latents, to show ranks differ

    def _eps(self, x, t, y):
        with self.autocast():
            return self.state.nnet(x, t, y)

    def __call__(self, batches):
        acc, st, losses, grad_norm = self.acc, self.state, [], None
        for _ in range(acc.gradient_accumulation_steps):
            z, y = self.data.next_batch(batches, st.rng)
            if self.data_fingerprint is None:
                self.data_fingerprint = z.double().sum().view(1)
            with acc.accumulate(st.nnet):
                loss = sde.diffusion_loss(self._eps, z, y, generator=st.rng.device)
                acc.backward(loss.mean())
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(st.nnet.parameters(), self.max_norm)
                st.optimizer.step()
                st.optimizer.zero_grad(set_to_none=True)
            losses.append(acc.gather(loss.detach()))
        st.lr_scheduler.step()
        st.ema.update(self.decay)
        st.step += 1
        if hasattr(grad_norm, 'full_tensor'):          # FSDP2 returns a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        return torch.cat(losses).mean(), grad_norm


class StepValues:
    """Per-step losses and the last gradient norm since the last log record, as device tensors until `read()`.

    `read()` brings every pending value to the host in one transfer and raises FloatingPointError at the first
    non-finite loss, naming its step; `record()` averages the values read since the last record and starts a new
    window. Every process holds the same (gathered) losses, so all stop at the same read.
    """

    def __init__(self, ckpt_root):
        self.ckpt_root, self.pending, self.losses, self.grad_norm = ckpt_root, [], [], float('nan')
        self.start = time.time()

    def add(self, step, loss, grad_norm):
        self.pending.append((step, loss, grad_norm))

    def read(self):
        if not self.pending:
            return
        steps, losses, grad_norm = [p[0] for p in self.pending], [p[1] for p in self.pending], self.pending[-1][2]
        tensors = [t.detach().float().reshape(()) for t in losses]
        on_device = torch.is_tensor(grad_norm)          # DeepSpeed reports a Python float (read by DeepSpeed)
        if on_device:
            tensors.append(grad_norm.detach().float().reshape(()))
        values = torch.stack(tensors).tolist()          # the one device-to-host read
        self.pending = []
        for step, loss in zip(steps, values):
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss} at step {step}; stopping. The last complete checkpoint in "
                    f"{self.ckpt_root} is kept (lower the learning rate or enable gradient clipping).")
        self.losses.extend(values[:len(steps)])
        self.grad_norm = values[-1] if on_device else float('nan') if grad_norm is None else float(grad_norm)

    def exclude_time(self, seconds):
        """Leave `seconds` (a checkpoint, an evaluation) out of the window's throughput."""
        self.start += seconds

    def record(self, samples_per_step):
        """{'loss', 'grad_norm', 'samples_per_sec'} of the window (after `read()`); starts the next window."""
        self.read()
        rate = len(self.losses) * samples_per_step / (time.time() - self.start)
        record = dict(loss=sum(self.losses) / len(self.losses), grad_norm=self.grad_norm, samples_per_sec=rate)
        self.losses, self.start = [], time.time()
        return record
