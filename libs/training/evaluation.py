"""In-training evaluation of the EMA network: the sample grid, the loss and score curves, and for digits the
classifier report.

Every process samples its share of the images (fixed batches of config.sample.mini_batch_size sample indices dealt
round-robin, libs.sampling.index_batches) with the EMA network under the launch's autocast; the images are gathered
on the main process, which writes the files. So no process waits while another samples, and the images are the
same whatever the process count.
"""
import contextlib
import json
import logging
import os
import time

import torch
import torch.distributed as dist
from torchvision.utils import save_image

from libs.training.run_logging import plot_loss_curve, plot_score_curve
from libs.evaluation.sample_scorer import to_uint8
from libs.sampling import generate, grid_labels, index_batches, index_noise, sampler_options, to_images

__all__ = ['Evaluator', 'gather_images', 'broadcast_from_main', 'DIGITS_SCORES']

log = logging.getLogger(__name__)
DIGITS_SCORES = ('sample_accuracy', 'frechet_distance_digits')
_REPORT_OFFSET = 10 ** 6        # the digits report's sample indices, away from the grid's


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_images(parts, n):
    """Images of samples 0..n-1 on the main process from every process's `parts` [(indices, images (B, ...))]
    (collective); None on the others."""
    if _distributed():
        everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(parts, everyone, dst=0)
        if dist.get_rank() != 0:
            return None
        parts = [p for rank_parts in everyone for p in rank_parts]
    order = {i: image for indices, images in parts for i, image in zip(indices, images)}
    if sorted(order) != list(range(n)):
        raise RuntimeError(f"gathered images of samples {sorted(order)[:5]}..., expected 0..{n - 1}")
    return torch.stack([order[i] for i in range(n)])


def broadcast_from_main(obj):
    """The main process's `obj` on every process (collective)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Evaluator:
    """Writes `samples/<step>.png`, `loss_curve.png`, `<metric>_curve.png` and (digits) `report.json` under
    `workdir`; every method is called by every process."""

    def __init__(self, config, workdir, data, metrics, rank, world_size, autocast=contextlib.nullcontext):
        self.config, self.workdir, self.data, self.metrics = config, workdir, data, metrics
        self.rank, self.world, self.autocast = rank, world_size, autocast
        self.sample_dir = os.path.join(workdir, 'samples')
        self.K = data.dataset.num_classes
        self.batch = int(config.sample.mini_batch_size)

    def grid_path(self, step):
        return os.path.join(self.sample_dir, f'{step}.png')

    def _sample(self, ema, n, labels, options, offset=0):
        """[(indices, images in [0, 1] on the CPU)] of this process's batches of samples offset + [0, n);
        sample i's noise from (seed, i), its label labels[i - offset] (or none)."""
        seed, parts = self.config.seed, []
        for idx in index_batches(n, self.batch, self.rank, self.world, offset):
            z = index_noise(idx, tuple(self.config.z_shape), seed=seed)
            y = None if labels is None else labels[idx[0] - offset:idx[-1] + 1 - offset]
            latents = generate(ema, z, y, options, seed, idx[0], autocast=self.autocast)
            parts.append(([i - offset for i in idx], to_images(latents, self.data.autoencoder)))
        return parts

    @torch.no_grad()
    def sample_grid(self, ema, step):
        """Grid from the EMA model with the config's sampler and guidance; one row per class if conditional.
        Returns its path on the main process, None elsewhere."""
        per_row, conditional = self.config.train.get('grid_columns', 10), self.data.conditional
        labels = grid_labels(self.K, per_row) if conditional else None
        n = len(labels) if conditional else 5 * per_row
        options = sampler_options(self.config, self.K)
        if not conditional:
            options.update(guidance=0.0, null_class=None)
        parts = [(idx, to_uint8(images)) for idx, images in self._sample(ema, n, labels, options)]
        images = gather_images(parts, n)
        if images is None:
            return None
        path = self.grid_path(step)
        save_image(images.float() / 255, path, nrow=per_row)
        return path

    @torch.no_grad()
    def digits_report(self, ema, step, train_info):
        """report.json: classifier accuracy and Fréchet distance of EMA samples, n per class (libs/digits_report).
        Returns ({'sample_accuracy', 'frechet_distance_digits'}, report path) on every process."""
        from libs.evaluation.digits_report import write_digits_report
        n_per_class = self.config.train.get('report_per_class', 50)
        labels = torch.arange(self.K).repeat_interleave(n_per_class)
        options = sampler_options(self.config, self.K)
        start = time.time()
        parts = self._sample(ema, len(labels), labels, options, offset=_REPORT_OFFSET)
        images = gather_images(parts, len(labels))
        result = None
        if images is not None:
            sampling_time = time.time() - start
            images = torch.nan_to_num(images, nan=0.0)      # a diverging network: NaN pixels, black as in a PNG
            path = write_digits_report(images, labels, self.workdir, extra=dict(
                step=step, **train_info, sampler=options['algorithm'], sample_steps=options['steps'],
                guidance=options['guidance'], sampling_images_per_sec=round(len(labels) / sampling_time, 2),
                num_processes=self.world))
            with open(path) as f:
                report = json.load(f)
            result = ({k: report[k] for k in DIGITS_SCORES}, path)
        return broadcast_from_main(result)

    def loss_curve(self):
        """Main process: loss_curve.png from the log; its path."""
        return plot_loss_curve(self.metrics.path, os.path.join(self.workdir, 'loss_curve.png'))

    def score_curve(self, history):
        """Main process: <metric>_curve.png of a libs.training.history.ScoreHistory; its path."""
        return plot_score_curve(history.points(), history.metric, history.best_step,
                                os.path.join(self.workdir, f'{history.metric}_curve.png'))
