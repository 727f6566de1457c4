"""One optimiser step: gradient_accumulation_steps micro-batches of the diffusion loss, clipping, the optimiser, the
LR schedule and the EMA update.

The step returns its values as device tensors (the loss averaged over every process and micro-batch, the gradient
norm before clipping, or None where the launch does not report it); reading them is the caller's choice.
"""
import torch

import sde
from libs.training.launch import forward_autocast

__all__ = ['TrainStep']


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
