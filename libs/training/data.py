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

from libs.config import ConfigError, is_conditional, num_classes
from libs.data.batching import StepBatchSampler
from libs.data.datasets import augment_batch, get_dataset
from libs.data.image_folder import CLASSES_FILE, read_class_record, write_class_record
from libs.training.preemption import ignore_in_worker, kill_workers_at_exit, stop_signal_names

__all__ = ['TrainData', 'latent_shape', 'check_classes']

log = logging.getLogger(__name__)


def latent_shape(config, dataset, autoencoder=None):
    """Shape of the diffusion variable the data set yields, after the autoencoder if any."""
    C, H, W = dataset.item_shape
    if dataset.kind == 'moments':
        return (C // 2, H, W)
    if autoencoder is not None:
        return autoencoder.latent_shape(dataset.item_shape)
    return (C, H, W)


def _describe(config, dataset):
    path = config.dataset.get('path')
    return f"data set {config.dataset.name!r}" + (f" ({path})" if path else '')


def check_classes(config, dataset):
    """ConfigError unless the network's class count, the training mode and the batch size fit the data set."""
    K, data_K, what = num_classes(config), dataset.num_classes, _describe(config, dataset)
    if data_K == 0 and is_conditional(config):
        raise ConfigError(f"config.train.mode='cond' but {what} has no classes (images without class subfolders): "
                          "set config.train.mode='uncond' (and config.sample.cfg=False)")
    if K != data_K:
        record = getattr(dataset, 'record', lambda: None)()
        names = record['classes'] if record else []
        shown = f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ''
        classes = f"{data_K} classes{shown}" if data_K else "no classes (unconditional: only the null class)"
        raise ConfigError(f"config.nnet.num_embeds_ada_norm={K} but {what} has {classes}: set "
                          f"config.nnet.num_embeds_ada_norm={data_K}")
    if len(dataset) < config.train.batch_size:
        raise ConfigError(f"{what} has {len(dataset)} items, fewer than one batch (config.train.batch_size="
                          f"{config.train.batch_size}): add images or lower config.train.batch_size")


class TrainData:
    """Data set and autoencoder of `config`, checked against config.z_shape, the network's class count, the
    training mode and the batch size, and against the classes.json of the run in `workdir` (if any: a resumed run
    whose classes changed would give its class ids other meanings). `autocast` is the launch's autocast context
    factory (libs.training.launch.forward_autocast), for the encoder."""

    def __init__(self, config, device, autocast=contextlib.nullcontext, workdir=None):
        self.config, self.device, self.autocast = config, torch.device(device), autocast
        self.conditional = is_conditional(config)
        self.dataset = get_dataset(**config.dataset)
        check_classes(config, self.dataset)
        self.class_record = getattr(self.dataset, 'record', lambda: None)()
        if workdir is not None:
            self._check_run_classes(workdir)
        self.autoencoder = None
        if config.get('autoencoder'):
            from libs.data.autoencoder import load_autoencoder
            self.autoencoder = load_autoencoder(config.autoencoder.pretrained_path, device=device)
        elif self.dataset.kind == 'moments':
            raise ValueError(f"data set {config.dataset.name!r} holds latents: config.autoencoder is required")
        shape = latent_shape(config, self.dataset, self.autoencoder)
        if tuple(config.z_shape) != shape:
            raise ValueError(f"config.z_shape={tuple(config.z_shape)} but data set {config.dataset.name!r} gives "
                             f"{shape} (item shape {self.dataset.item_shape})")
        self.pin_memory = bool(config.train.get('pin_memory', True)) and self.device.type == 'cuda'

    def _check_run_classes(self, workdir):
        path = os.path.join(workdir, CLASSES_FILE)
        if self.class_record is None or not os.path.isfile(path):
            return
        before, found = read_class_record(path)['classes'], self.class_record['classes']
        if before != found:
            raise ConfigError(f"the {len(found)} classes of {_describe(self.config, self.dataset)} differ from the "
                              f"{len(before)} the run in {workdir} was trained on ({path}): its checkpoints' class ids "
                              "would mean other classes; train in a new workdir")

    def write_class_names(self, *folders):
        """Main process: the data set's classes.json into each folder (nothing if its class names are unknown)."""
        if self.class_record is not None:
            for folder in folders:
                write_class_record(folder, self.class_record)

    def log_summary(self):
        """Log what the data set found at start-up (its `notes`: items, classes, skipped and upsampled files)."""
        for level, message in getattr(self.dataset, 'notes', ()):
            log.log(level, message)

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
        if workers:
            kill_workers_at_exit()
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
