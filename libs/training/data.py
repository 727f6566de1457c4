"""The data side of a training run: data set, autoencoder, and each process's stream of training latents.

Micro-batch s of process r is a fixed slice of a seeded permutation (libs.data.batching.StepBatchSampler), flips and
label dropout come from the run's `data` generator and the autoencoder's posterior samples from its `device`
generator (libs.training.rng), so a resumed run sees exactly the batches an uninterrupted one would. The sampler
and those draws run in the training process, the DataLoader workers only load items: the number of workers does
not change what a step sees.

Loading stays off the critical path: `config.train.num_workers` worker processes (each keeps
`config.train.prefetch_factor` batches ready, default 2), batches in pinned memory when training on CUDA
(`config.train.pin_memory`, default True; nothing to pin for elsewhere) copied asynchronously; flips, label
dropout and the autoencoder run on the device, the encoder under the launch's autocast. (The batch sampler is
endless, so the workers live as long as the run: DataLoader's `persistent_workers` would change nothing.) The workers
ignore the run's stop signals (libs.training.preemption).
"""
import contextlib
import functools
import logging
import os

import torch

from libs.config import is_conditional, num_classes
from libs.data.batching import StepBatchSampler
from libs.data.datasets import augment_batch, get_dataset
from libs.training.preemption import ignore_in_worker, stop_signal_names

__all__ = ['TrainData', 'latent_shape']

log = logging.getLogger(__name__)


def latent_shape(config, dataset):
    """Shape of the diffusion variable the data set yields, after the autoencoder if any."""
    C, H, W = dataset.item_shape
    if dataset.kind == 'moments':
        return (C // 2, H, W)
    if config.get('autoencoder'):
        return (4, H // 8, W // 8)
    return (C, H, W)


class TrainData:
    """Data set and autoencoder of `config`, checked against config.z_shape and the network's class count.
    `autocast` is the launch's autocast context factory (libs.training.launch.forward_autocast), for the encoder."""

    def __init__(self, config, device, autocast=contextlib.nullcontext):
        self.config, self.device, self.autocast = config, torch.device(device), autocast
        self.conditional = is_conditional(config)
        self.dataset = get_dataset(**config.dataset)
        self.autoencoder = None
        if config.get('autoencoder'):
            from libs.data.autoencoder import load_autoencoder
            self.autoencoder = load_autoencoder(config.autoencoder.pretrained_path, device=device)
        elif self.dataset.kind == 'moments':
            raise ValueError(f"data set {config.dataset.name!r} holds latents: config.autoencoder is required")
        shape = latent_shape(config, self.dataset)
        if tuple(config.z_shape) != shape:
            raise ValueError(f"config.z_shape={tuple(config.z_shape)} but data set {config.dataset.name!r} gives "
                             f"{shape} (item shape {self.dataset.item_shape})")
        K = num_classes(config)
        if K != self.dataset.num_classes:
            raise ValueError(f"config.nnet.num_embeds_ada_norm={K} but the data set has {self.dataset.num_classes} classes")
        self.pin_memory = bool(config.train.get('pin_memory', True)) and self.device.type == 'cuda'

    def loader(self, rank, world_size, start_micro_batch):
        """DataLoader of this process's micro-batches from global micro-batch `start_micro_batch` on (endless)."""
        tc = self.config.train
        sampler = StepBatchSampler(len(self.dataset), tc.batch_size, rank, world_size,
                                   seed=self.config.seed, start=start_micro_batch)
        workers = tc.get('num_workers', 0)
        local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        if workers * local > (os.cpu_count() or 1):
            log.warning('config.train.num_workers=%d x %d process(es) on this machine = %d loader processes for %d '
                        'CPUs: they will compete for the cores', workers, local, workers * local, os.cpu_count())
        # the workers ignore the stop signals: a signal to the process group stops the run through this process
        ignore_stops = functools.partial(ignore_in_worker, stop_signal_names(self.config))
        extra = {'prefetch_factor': tc.get('prefetch_factor', 2), 'worker_init_fn': ignore_stops} if workers else {}
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers,
                                           pin_memory=self.pin_memory, **extra)

    @torch.no_grad()
    def to_latents(self, x, rng):
        """Latents of a micro-batch x on the device: posterior samples (from the `device` generator) of the
        autoencoder's moments (stored, or encoded under the launch's autocast and taken back to fp32)."""
        if self.dataset.kind == 'moments':
            return self.autoencoder.sample(x, generator=rng.device)
        if self.autoencoder is not None:
            with self.autocast():
                moments = self.autoencoder.encode_moments(x)
            return self.autoencoder.sample(moments.float(), generator=rng.device)
        return x

    def next_batch(self, batches, rng):
        """(latents z, labels y) of the next micro-batch, on the device (copied without blocking)."""
        x, y = next(batches)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x, y = augment_batch(x, y, self.dataset, self.config.dataset.get('p_uncond', 0.0), self.conditional, rng.data)
        return self.to_latents(x, rng), y
