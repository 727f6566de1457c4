"""Sampling a trained network: one specification built from the config, one generate loop.

    spec = SamplingSpec.from_config(config)                  # config.sample, checked once
    for indices, images in sample_batches(nnet, spec, spec.index_batches(n)[rank::world]):
        ...                                                  # images (B, C, H, W) floats in [0, 1], on the CPU

Sample i's initial noise, random class label and sampler noise (the ancestral sampler, stochastic diffusers
schedulers) depend only on (config.seed, i). Batches are fixed chunks of indices dealt round-robin to the processes,
so any number of processes and any batch size make the same images (up to the float rounding of batched matrix
products). The evaluation, the in-training FID, the training's sample grids and the digits report all sample
through `sample_batches`.
"""
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

import sde
from libs.config import ConfigError, is_conditional, num_classes

__all__ = ['SAMPLE_KEYS', 'SamplingSpec', 'index_noise', 'index_labels', 'generate', 'decode', 'sample_batches',
           'sample_images']

# Keys of config.sample, and who reads them besides the sampling specification.
SAMPLE_KEYS = ('algorithm', 'sample_steps', 'cfg', 'scale', 'mini_batch_size', 'vis_label', 'ug_theta', 'ug_eta',
               'ug_T',
               'n_samples', 'path', 'inception_path',      # the evaluation (libs.evaluation.evaluate)
               'intermediate_n_samples')                   # the in-training FID (libs.training.evaluation)
UPSAMPLE_KEYS = ('ug_theta', 'ug_eta', 'ug_T')
# sde's 'diffusers' sampler takes a scheduler object, which DiMPipeline (libs.pipeline) gives, not a config file.
CONFIG_ALGORITHMS = tuple(sorted(set(sde.ALGORITHMS) - {'diffusers'}))


def _generator(seed, index):
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))


def index_noise(indices, shape, seed):
    """(len(indices), *shape) fp32 standard normal noise; row k depends only on (seed, indices[k])."""
    return torch.stack([torch.randn(shape, generator=_generator(seed, i)) for i in indices])


def index_labels(indices, num_classes, seed):
    """(len(indices),) labels uniform in [0, K); label k depends only on (seed, indices[k])."""
    probs = torch.ones(num_classes, dtype=torch.float64)
    return torch.tensor([torch.multinomial(probs, 1, generator=_generator(seed + 1, i)).item() for i in indices])


def _sample_section_problems(s, algorithm, cfg):
    unknown = sorted(set(s.keys()) - set(SAMPLE_KEYS))
    if unknown:
        yield f"unknown key(s) {', '.join('config.sample.' + k for k in unknown)} (known: {', '.join(SAMPLE_KEYS)})"
    if algorithm not in CONFIG_ALGORITHMS:
        yield f"config.sample.algorithm={algorithm!r}; expected one of {', '.join(CONFIG_ALGORITHMS)}"
    elif algorithm != 'dpm_solver_upsample_g':
        yield from (f"config.sample.{k} is read only by algorithm 'dpm_solver_upsample_g', not {algorithm!r}"
                    for k in UPSAMPLE_KEYS if k in s)
    if 'scale' in s and not cfg:
        yield "config.sample.scale is read only with config.sample.cfg=True (classifier-free guidance)"
    steps = s.get('sample_steps')
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        yield f"config.sample.sample_steps={steps!r}: must be an integer >= 1"
    batch = s.get('mini_batch_size')
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        yield f"config.sample.mini_batch_size={batch!r}: must be an integer >= 1"


@dataclass(frozen=True)
class SamplingSpec:
    """What to sample and how, from config.sample (keys keep their names): `algorithm`, `sample_steps`, `scale`
    (the classifier-free guidance s in eps_c + s (eps_c - eps_u); 0 without guidance), the class count `num_classes`
    (K; the null class is K), `conditional`, `seed`, `z_shape`, `mini_batch_size`, `vis_label` (every random label
    replaced by this class, or None), the upsample-guidance options (config.nnet.multi_times and
    config.sample.ug_*) for 'dpm_solver_upsample_g', and the diffusers scheduler object of algorithm 'diffusers'
    (libs.pipeline; never from a config)."""
    algorithm: str
    sample_steps: int
    scale: float
    num_classes: int
    conditional: bool
    seed: int
    z_shape: tuple
    mini_batch_size: int
    vis_label: Optional[int] = None
    upsample: tuple = ()            # ((name, value), ...) for sde.sample
    scheduler: object = None        # algorithm 'diffusers' only

    @classmethod
    def from_config(cls, config):
        """The specification of `config`; ConfigError names every key that is wrong or that nothing reads."""
        s = config.sample
        cfg, conditional, K = bool(s.get('cfg', False)), is_conditional(config), num_classes(config)
        problems = list(_sample_section_problems(s, s.get('algorithm'), cfg))
        if cfg and not conditional:
            problems.append("config.sample.cfg=True needs a class-conditional run, but config.train.mode='uncond'")
        vis_label = s.get('vis_label')
        if vis_label is not None and not (conditional and 0 <= vis_label < K):
            problems.append(f"config.sample.vis_label={vis_label} needs a conditional model and 0 <= label < {K}")
        scale = float(s.scale) if cfg else 0.0
        if scale < 0:
            problems.append(f"config.sample.scale={s.scale}: must be >= 0")
        if problems:
            raise ConfigError('invalid config.sample: ' + '; '.join(problems))
        upsample = ()
        if s.algorithm == 'dpm_solver_upsample_g':
            upsample = (('multi_times', int(config.nnet.multi_times)), *((k, float(s[k])) for k in UPSAMPLE_KEYS))
        return cls(algorithm=s.algorithm, sample_steps=int(s.sample_steps), scale=scale, num_classes=K,
                   conditional=conditional, seed=int(config.seed), z_shape=tuple(config.z_shape),
                   mini_batch_size=int(s.mini_batch_size), vis_label=vis_label, upsample=upsample)

    def replace(self, seed=None, sample_steps=None, scale=None, mini_batch_size=None):
        """This specification with the given fields changed (None keeps one); ValueError for a value sampling
        cannot use."""
        changes = {k: v for k, v in dict(seed=seed, sample_steps=sample_steps, scale=scale,
                                         mini_batch_size=mini_batch_size).items() if v is not None}
        for key in ('sample_steps', 'mini_batch_size'):
            if key in changes and (isinstance(changes[key], bool) or not isinstance(changes[key], int)
                                   or changes[key] < 1):
                raise ValueError(f"{key}={changes[key]!r}: must be an integer >= 1")
        if 'scale' in changes:
            changes['scale'] = float(changes['scale'])
            if changes['scale'] < 0:
                raise ValueError(f"guidance scale={changes['scale']}: must be >= 0")
            if changes['scale'] > 0 and not self.conditional:
                raise ValueError("guidance needs a class-conditional model; this one is unconditional")
        if 'seed' in changes:
            changes['seed'] = int(changes['seed'])
        return dataclasses.replace(self, **changes)

    def labels(self, indices):
        """(B,) class labels of samples `indices`: uniform over the K classes by (seed, i), or all vis_label; None
        for an unconditional run."""
        if not self.conditional:
            return None
        if self.vis_label is not None:
            return torch.full((len(indices),), int(self.vis_label))
        return index_labels(indices, self.num_classes, self.seed)

    def index_batches(self, n, offset=0):
        """Every batch of sample indices offset + [0, n): offset + [b * mini_batch_size, (b + 1) * mini_batch_size).
        A process takes its share as `spec.index_batches(n)[rank::world_size]`."""
        step = self.mini_batch_size
        return [range(offset + s, offset + min(s + step, n)) for s in range(0, n, step)]

    def sde_options(self):
        """Keyword arguments of `sde.sample`."""
        scheduler = dict(scheduler=self.scheduler) if self.algorithm == 'diffusers' else {}
        return dict(algorithm=self.algorithm, sample_steps=self.sample_steps, scale=self.scale,
                    null_class=self.num_classes if self.scale > 0 else None, **dict(self.upsample), **scheduler)

    def record(self):
        """The fields that determine the images (an evaluation folder's run.json)."""
        return dict(seed=self.seed, sampler=self.algorithm, steps=self.sample_steps, guidance=self.scale,
                    z_shape=list(self.z_shape), conditional=self.conditional, vis_label=self.vis_label,
                    mini_batch_size=self.mini_batch_size, **dict(self.upsample))


@torch.no_grad()
def generate(nnet, spec, indices, labels=None, autocast=contextlib.nullcontext):
    """Latents (B, *z_shape) fp32 of samples `indices` with class labels (B,) or None, from their index noise.
    The network runs inside `autocast()` (e.g. a launch's bf16 autocast), the sampler in fp32."""
    device = next(nnet.parameters()).device

    def eps_fn(x, t, y):
        with autocast():
            return nnet(x, t.float(), y).float()

    options = spec.sde_options()
    if spec.algorithm in ('euler_maruyama', 'diffusers'):
        options['generator'] = [_generator(spec.seed + 2, i) for i in indices]
    z = index_noise(indices, spec.z_shape, spec.seed).to(device)
    y = None if labels is None else torch.as_tensor(labels).to(device)
    return sde.sample(eps_fn, z, y=y, **options)


@torch.no_grad()
def decode(latents, autoencoder=None):
    """Latents -> images in [0, 1] (B, C, H, W) on the CPU: decoded by the autoencoder (in its parameters' device
    and dtype), or pixel space as is."""
    if autoencoder is not None:
        weight = next(autoencoder.parameters())
        latents = autoencoder.decode(latents.to(weight.device, weight.dtype))
    return ((latents.float() + 1) / 2).clamp(0, 1).cpu()


def sample_batches(nnet, spec, batches, labels=None, offset=0, autoencoder=None, autocast=contextlib.nullcontext,
                   progress=None):
    """Yields (indices, images (B, C, H, W) in [0, 1] on the CPU) for each range of sample indices in `batches`.

    labels: None for the specification's (`spec.labels(indices)`), else a tensor whose entry i - offset is the class
    of sample i. progress: keyword arguments of a tqdm bar over the batches, or None for no bar.
    """
    if progress is not None:
        from tqdm import tqdm
        batches = tqdm(batches, unit='batch', dynamic_ncols=True, **progress)
    for indices in batches:
        y = spec.labels(indices) if labels is None else labels[indices[0] - offset:indices[-1] + 1 - offset]
        yield indices, decode(generate(nnet, spec, indices, y, autocast), autoencoder)


def sample_images(nnet, spec, labels=None, n=None, seed=None, autoencoder=None, autocast=contextlib.nullcontext):
    """Images (B, C, H, W) in [0, 1] of samples 0..B-1 in one process: class `labels` (a list or tensor of B
    class ids), or `n` samples of the specification's labels; `seed` replaces config.seed."""
    if (labels is None) == (n is None):
        raise ValueError("give either labels (one class id per image) or n (the number of images)")
    spec = spec.replace(seed=seed)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.dim() != 1 or (labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < spec.num_classes)):
            raise ValueError(f"labels must be class ids in [0, {spec.num_classes}), got {labels.tolist()}")
        n = len(labels)
        if not spec.conditional:
            raise ValueError("this run is unconditional: give n, not labels")
    parts = [images for _, images in sample_batches(nnet, spec, spec.index_batches(n), labels,
                                                    autoencoder=autoencoder, autocast=autocast)]
    return torch.cat(parts)
