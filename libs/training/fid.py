"""The in-training FID of the EMA network, as the official training loop scores its checkpoints.

N = config.sample.intermediate_n_samples (default 10,000) samples are made as eval_ldm_discrete.py makes its
samples: sample i's noise and label depend only on (config.seed, i) (libs.sampling.index_noise / index_labels),
fixed batches of config.sample.mini_batch_size indices are dealt round-robin to the processes, and the config's
sampler, steps and guidance are used; the network runs under the launch's autocast, the sampler and the decoder in
fp32. Each process decodes its images, quantises them to uint8 as a PNG would hold them and computes their
Inception features in memory (libs.evaluation.sample_scorer.SampleScorer; nothing is written); the features are gathered by
sample index and every process computes the same metrics. The FID at a step is therefore the same whatever the
process count, and equals eval_ldm_discrete.py's on the checkpoint's nnet_ema.pth with n_samples = N.
"""
import contextlib
import logging
import time

import torch
from tqdm import tqdm

from libs.evaluation.adm_metrics import load_reference
from libs.evaluation.fid import load_inception
from libs.evaluation.sample_scorer import SampleScorer, to_uint8
from libs.sampling import generate, index_batches, index_labels, index_noise, sampler_options, to_images
from libs.training.config import intermediate_n_samples

__all__ = ['TrainingFID', 'load_fid_files', 'FID_OFF_HINT']

log = logging.getLogger(__name__)
FID_OFF_HINT = "(or set config.train.fid_interval=0 to train without the in-training FID)"


def load_fid_files(config, device, load):
    """(reference, Inception network) of the in-training FID, each loaded through `load(loader, *args)`
    (eval_ldm_discrete.FileChecks, which collects the missing files with their sources)."""
    if not config.dataset.get('fid_stat'):
        raise ValueError(f"config.dataset.fid_stat is not set: no reference statistics for the in-training FID of "
                         f"{config.dataset.name!r} (make them with scripts/fid_reference_stats.py) {FID_OFF_HINT}")
    return (load(load_reference, config.dataset.fid_stat),
            load(load_inception, config.sample.get('inception_path') or None, device))


class TrainingFID:
    """`fid(ema, step) -> {'fid<N>': ..., 'sfid<N>', 'inception_score<N>', ...}` (the metrics the reference file
    allows, libs.evaluation.adm_metrics.sample_metrics), on every process (collective)."""

    def __init__(self, config, reference, inception, autoencoder, rank, world_size, autocast=contextlib.nullcontext):
        self.config, self.reference, self.inception, self.autoencoder = config, reference, inception, autoencoder
        self.rank, self.world, self.autocast = rank, world_size, autocast
        self.n = intermediate_n_samples(config)
        self.name = f'fid{self.n}'
        self.K = int(config.nnet.get('num_embeds_ada_norm', 1000))
        self.conditional = config.train.mode == 'cond'
        self.options = sampler_options(config, self.K)
        if not self.conditional:
            self.options.update(guidance=0.0, null_class=None)

    @torch.no_grad()
    def __call__(self, ema, step):
        start, seed, z_shape = time.time(), int(self.config.seed), tuple(self.config.z_shape)
        scorer = SampleScorer(self.inception, self.n)
        mine = index_batches(self.n, int(self.config.sample.mini_batch_size), self.rank, self.world)
        for idx in tqdm(mine, desc=f'{self.name} of step {step}', unit='batch', disable=self.rank != 0,
                        dynamic_ncols=True, leave=False):
            z = index_noise(idx, z_shape, seed)
            y = index_labels(idx, self.K, seed) if self.conditional else None
            latents = generate(ema, z, y, self.options, seed, idx[0], autocast=self.autocast)
            scorer.add(to_uint8(to_images(latents, self.autoencoder)), idx)
        metrics, _ = scorer.score(self.reference)
        scores = {f'{k}{self.n}': v for k, v in metrics.items()}
        scores[f'{self.name}_time_s'] = round(time.time() - start, 2)
        log.info('step %d: %s %.4f (%d samples, %s, %d steps, guidance %g; %.1f s)', step, self.name,
                 scores[self.name], self.n, self.options['algorithm'], self.options['steps'],
                 self.options['guidance'], scores[f'{self.name}_time_s'])
        return scores
