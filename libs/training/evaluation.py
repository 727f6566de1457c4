"""In-training evaluation of the EMA network: the sample grid, the score of a checkpoint (the FID, or for digits the
classifier report), and the loss and score curves.

Every process samples its share of the images through libs.sampling (fixed batches of config.sample.mini_batch_size
sample indices dealt round-robin) with the EMA network under the launch's autocast, so no process waits while another
samples and the images are the same whatever the process count.

The FID (`fid<N>`, N = config.sample.intermediate_n_samples, default 10,000) is made as the evaluation makes its
samples: each process quantises its images to uint8 as a PNG would hold them and computes their Inception features
in memory (libs.evaluation.sample_scorer; nothing is written); the features are gathered by sample index and every
process computes the same metrics. It therefore equals eval_ldm_discrete.py's FID on the checkpoint's nnet_ema.pth
with n_samples = N.
"""
import contextlib
import json
import logging
import os
import time

import torch
from torchvision.utils import save_image

from libs.distributed import broadcast_from_main, gather_object_on_main
from libs.evaluation.adm_metrics import load_reference
from libs.evaluation.digits_report import write_digits_report
from libs.evaluation.fid import load_inception
from libs.evaluation.sample_scorer import SampleScorer, to_uint8
from libs.sampling import SamplingSpec, sample_batches
from libs.training.config import intermediate_n_samples
from libs.training.run_logging import plot_loss_curve, plot_score_curve

__all__ = ['Evaluator', 'load_fid_files', 'FID_OFF_HINT', 'DIGITS_SCORES']

log = logging.getLogger(__name__)
DIGITS_SCORES = ('sample_accuracy', 'frechet_distance_digits')
FID_OFF_HINT = "(or set config.train.fid_interval=0 to train without the in-training FID)"
_REPORT_OFFSET = 10 ** 6        # the digits report's sample indices, away from the grid's


def load_fid_files(config, device, load):
    """(reference, Inception network) of the in-training FID, each loaded through `load(loader, *args)`
    (libs.files.FileChecks, which collects the missing files with their sources)."""
    if not config.dataset.get('fid_stat'):
        raise ValueError(f"config.dataset.fid_stat is not set: no reference statistics for the in-training FID of "
                         f"{config.dataset.name!r} (make them with scripts/fid_reference_stats.py) {FID_OFF_HINT}")
    return (load(load_reference, config.dataset.fid_stat),
            load(load_inception, config.sample.get('inception_path') or None, device))


def _gather_images(parts, n):
    """Images of samples 0..n-1 on the main process from every process's `parts` [(indices, images (B, ...))]
    (collective); None on the others."""
    everyone = gather_object_on_main(parts)
    if everyone is None:
        return None
    order = {i: image for rank_parts in everyone for indices, images in rank_parts for i, image in zip(indices, images)}
    if sorted(order) != list(range(n)):
        raise RuntimeError(f"gathered images of samples {sorted(order)[:5]}..., expected 0..{n - 1}")
    return torch.stack([order[i] for i in range(n)])


class Evaluator:
    """Writes `samples/<step>.png`, `loss_curve.png`, `<metric>_curve.png` and (digits) `report.json` under
    `workdir`, and scores checkpoints; every method but the curves is called by every process. `fid_files`:
    (reference, Inception) for the FID, or None."""

    def __init__(self, config, workdir, autoencoder, rank, world_size, autocast=contextlib.nullcontext,
                 fid_files=None):
        self.config, self.workdir, self.autoencoder = config, workdir, autoencoder
        self.rank, self.world, self.autocast = rank, world_size, autocast
        self.spec = SamplingSpec.from_config(config)
        self.sample_dir = os.path.join(workdir, 'samples')
        self.fid_files = fid_files
        self.fid_n = intermediate_n_samples(config)
        self.fid_name = f'fid{self.fid_n}'

    def grid_path(self, step):
        return os.path.join(self.sample_dir, f'{step}.png')

    def _sample(self, ema, n, labels=None, offset=0):
        """This process's share of samples offset + [0, n): an iterator of (indices, images in [0, 1])."""
        batches = self.spec.index_batches(n, offset)[self.rank::self.world]
        return sample_batches(ema, self.spec, batches, labels, offset, self.autoencoder, self.autocast)

    @torch.no_grad()
    def sample_grid(self, ema, step):
        """Grid from the EMA model with the config's sampler and guidance; one row per class (the first 10) if
        conditional. Returns its path on the main process, None elsewhere."""
        per_row, spec = self.config.train.get('grid_columns', 10), self.spec
        labels = torch.arange(min(spec.num_classes, 10)).repeat_interleave(per_row) if spec.conditional else None
        n = len(labels) if spec.conditional else 5 * per_row
        parts = [(idx, to_uint8(images)) for idx, images in self._sample(ema, n, labels)]
        images = _gather_images(parts, n)
        if images is None:
            return None
        path = self.grid_path(step)
        save_image(images.float() / 255, path, nrow=per_row)
        return path

    @torch.no_grad()
    def fid(self, ema, step):
        """{'fid<N>': ..., 'sfid<N>', 'inception_score<N>', ...} (the metrics the reference file allows) and
        'fid<N>_time_s', on every process (collective)."""
        start, reference, inception = time.time(), *self.fid_files
        scorer = SampleScorer(inception, self.fid_n)
        for indices, images in sample_batches(
                ema, self.spec, self.spec.index_batches(self.fid_n)[self.rank::self.world],
                autoencoder=self.autoencoder, autocast=self.autocast,
                progress=dict(desc=f'{self.fid_name} of step {step}', disable=self.rank != 0, leave=False)):
            scorer.add(to_uint8(images), indices)
        metrics, _ = scorer.score(reference)
        scores = {f'{k}{self.fid_n}': v for k, v in metrics.items()}
        scores[f'{self.fid_name}_time_s'] = round(time.time() - start, 2)
        log.info('step %d: %s %.4f (%d samples, %s, %d steps, guidance %g; %.1f s)', step, self.fid_name,
                 scores[self.fid_name], self.fid_n, self.spec.algorithm, self.spec.sample_steps, self.spec.scale,
                 scores[f'{self.fid_name}_time_s'])
        return scores

    @torch.no_grad()
    def digits_report(self, ema, step, train_info):
        """report.json: classifier accuracy and Fréchet distance of EMA samples, n per class (digits_report).
        Returns ({'sample_accuracy', 'frechet_distance_digits'}, report path) on every process."""
        n_per_class, spec = self.config.train.get('report_per_class', 50), self.spec
        labels = torch.arange(spec.num_classes).repeat_interleave(n_per_class)
        start = time.time()
        parts = [([i - _REPORT_OFFSET for i in idx], images)
                 for idx, images in self._sample(ema, len(labels), labels, offset=_REPORT_OFFSET)]
        images = _gather_images(parts, len(labels))
        result = None
        if images is not None:
            sampling_time = time.time() - start
            images = torch.nan_to_num(images, nan=0.0)      # a diverging network: NaN pixels, black as in a PNG
            path = write_digits_report(images, labels, self.workdir, extra=dict(
                step=step, **train_info, sampler=spec.algorithm, sample_steps=spec.sample_steps,
                guidance=spec.scale, sampling_images_per_sec=round(len(labels) / sampling_time, 2),
                num_processes=self.world))
            with open(path) as f:
                report = json.load(f)
            result = ({k: report[k] for k in DIGITS_SCORES}, path)
        return broadcast_from_main(result)

    def loss_curve(self, log_path):
        """Main process: loss_curve.png from the JSONL log at `log_path`; its path."""
        return plot_loss_curve(log_path, os.path.join(self.workdir, 'loss_curve.png'))

    def score_curve(self, history):
        """Main process: <metric>_curve.png of a libs.training.history.ScoreHistory; its path."""
        return plot_score_curve(history.points(), history.metric, history.best_step,
                                os.path.join(self.workdir, f'{history.metric}_curve.png'))
