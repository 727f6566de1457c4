"""Per-process random generators of a training run, saved in rng.pth so a resumed run draws the same numbers.

`data` (CPU) draws the host-side choices: random flips and CFG label dropout. `device` lives on the training device
and draws everything made there: the diffusion timesteps and noise, and the autoencoder's posterior samples.
Each process seeds both from (seed, rank), so processes draw different numbers (unlike the default CUDA
generator, which `set_seed` gives the same seed on every process). Nothing in a training step uses the global
generators.
"""
import logging

import torch

__all__ = ['RunRNG']

log = logging.getLogger(__name__)
_DEVICE_STREAM = 10 ** 9            # keeps the device seeds apart from the data seeds


class RunRNG:
    """`data` and `device` generators of process `rank`."""

    def __init__(self, seed, rank, device):
        self.seed, self.rank, self.device_type = int(seed), int(rank), torch.device(device).type
        self.data = torch.Generator()
        self.device = torch.Generator(device=device)
        self.reseed(step=0)

    def reseed(self, step):
        base = self.seed * 1000 + self.rank + 7919 * step
        self.data.manual_seed(base)
        self.device.manual_seed(base + _DEVICE_STREAM)

    def state(self):
        return {'data': self.data.get_state(), 'device': self.device.get_state()}

    @staticmethod
    def file_state(states, device_type):
        """rng.pth from every process's `state()` (in rank order)."""
        return {'world_size': len(states), 'device_type': device_type,
                'data': [s['data'] for s in states], 'device': [s['device'] for s in states]}

    def restore(self, saved, world_size, step):
        """Continue the generators of rng.pth; reseed (with a warning) what cannot continue exactly."""
        if saved.get('world_size') != world_size:
            log.warning('checkpoint written by %s processes, now %d: random streams are reseeded',
                        saved.get('world_size'), world_size)
            self.reseed(step + 1)
            return
        self.data.set_state(saved['data'][self.rank])
        if saved.get('device_type') != self.device_type:
            log.warning('checkpoint written on %s, now on %s: the device random stream is reseeded',
                        saved.get('device_type'), self.device_type)
            self.device.manual_seed(self.seed * 1000 + self.rank + 7919 * (step + 1) + _DEVICE_STREAM)
            return
        self.device.set_state(saved['device'][self.rank])
