"""In-training evaluation of the EMA network: a sample grid, the loss curve, and for digits the classifier report.

Runs on the main process with the EMA module (libs.training.ema.EMA.module).
"""
import json
import logging
import os
import time

import torch
from torchvision.utils import save_image

from libs.run_logging import plot_loss_curve
from libs.sampling import generate, grid_labels, index_noise, sampler_options, to_images

__all__ = ['Evaluator']

log = logging.getLogger(__name__)


class Evaluator:
    """Writes `samples/<step>.png`, `loss_curve.png` and (digits) `report.json` under `workdir`."""

    def __init__(self, config, workdir, data, metrics):
        self.config, self.workdir, self.data, self.metrics = config, workdir, data, metrics
        self.sample_dir = os.path.join(workdir, 'samples')

    @torch.no_grad()
    def sample_grid(self, ema, step):
        """Grid from the EMA model with the config's sampler and guidance; one row per class if conditional."""
        K, per_row = self.data.dataset.num_classes, self.config.train.get('grid_columns', 10)
        conditional = self.data.conditional
        labels = grid_labels(K, per_row) if conditional else None
        n = len(labels) if conditional else 5 * per_row
        options = sampler_options(self.config, K)
        if not conditional:
            options.update(guidance=0.0, null_class=None)
        z = index_noise(range(n), tuple(self.config.z_shape), seed=self.config.seed)
        latents = generate(ema, z, labels, options, seed=self.config.seed)
        path = os.path.join(self.sample_dir, f'{step}.png')
        save_image(to_images(latents, self.data.autoencoder), path, nrow=per_row)
        return path

    @torch.no_grad()
    def digits_report(self, ema, step, train_info):
        """report.json: classifier accuracy and Fréchet distance of EMA samples, n per class (libs/digits_report)."""
        from libs.digits_report import write_digits_report
        K, n = self.data.dataset.num_classes, self.config.train.get('report_per_class', 50)
        labels = torch.arange(K).repeat_interleave(n)
        options, batch = sampler_options(self.config, K), self.config.sample.mini_batch_size
        start, images = time.time(), []
        for b in range(0, len(labels), batch):
            idx = range(10 ** 6 + b, 10 ** 6 + min(b + batch, len(labels)))    # away from the grid's indices
            z = index_noise(idx, tuple(self.config.z_shape), seed=self.config.seed)
            images.append(to_images(generate(ema, z, labels[b:b + batch], options, self.config.seed, idx[0])))
        sampling_time = time.time() - start
        return write_digits_report(torch.cat(images), labels, self.workdir, extra=dict(
            step=step, **train_info, sampler=options['algorithm'], sample_steps=options['steps'],
            guidance=options['guidance'], sampling_images_per_sec=round(len(labels) / sampling_time, 2)))

    def __call__(self, ema, step, train_info):
        """Evaluate `ema` at `step`; `train_info` (wall time, throughput) goes into the digits report."""
        path = self.sample_grid(ema, step)
        outputs = {'grid': path,
                   'loss_curve': plot_loss_curve(self.metrics.path, os.path.join(self.workdir, 'loss_curve.png'))}
        scores = {}
        if self.config.dataset.name == 'digits':
            outputs['report'] = self.digits_report(ema, step, train_info)
            with open(outputs['report']) as f:
                report = json.load(f)
            scores = {k: report[k] for k in ('sample_accuracy', 'frechet_distance_digits')}
        self.metrics.log({'step': step, **scores, **{f'{k}_path': v for k, v in outputs.items()}},
                         images={'samples': path})
        log.info('step %d: %s', step, ', '.join(f'{k} -> {v}' for k, v in outputs.items()))
        return outputs
