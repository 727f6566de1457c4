"""Sampling a trained network with a config's sampler, reproducibly by sample index.

Sample i's initial noise and class label depend only on (seed, i); a batch's sampler noise (the
ancestral sampler) only on (seed, first index). Batches are fixed chunks of indices (`index_batches`), dealt
round-robin to the processes, so any number of processes produces the same images.
"""
import contextlib

import torch

import sde

__all__ = ['sampler_options', 'index_noise', 'index_labels', 'index_batches', 'generate', 'to_images', 'grid_labels']


def sampler_options(config, num_classes):
    """Keyword arguments of `sde.sample` from config.sample (and config.nnet.multi_times for upsampling)."""
    s = config.sample
    guidance = float(s.scale) if s.get('cfg', False) else 0.0
    options = {}
    if s.algorithm == 'dpm_solver_upsample_g':
        options = dict(multi_times=int(config.nnet.multi_times), ug_theta=float(s.ug_theta),
                       ug_eta=float(s.ug_eta), ug_T=float(s.ug_T))
    return dict(algorithm=s.algorithm, steps=int(s.sample_steps), guidance=guidance,
                null_class=num_classes if guidance > 0 else None, **options)


def _generator(seed, index):
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))


def index_noise(indices, shape, seed):
    """(len(indices), *shape) fp32 standard normal noise; row k depends only on (seed, indices[k])."""
    return torch.stack([torch.randn(shape, generator=_generator(seed, i)) for i in indices])


def index_labels(indices, num_classes, seed, weights=None):
    """(len(indices),) labels in [0, K): uniform, or proportional to `weights`; label k depends on (seed, indices[k])."""
    probs = torch.ones(num_classes, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return torch.tensor([torch.multinomial(probs, 1, generator=_generator(seed + 1, i)).item() for i in indices])


def index_batches(n, batch, rank=0, world_size=1, offset=0):
    """Process `rank`'s share of the batches of sample indices offset + [0, n): batch b is offset + [b * batch,
    min((b + 1) * batch, n)), and process r takes batches r, r + world_size, ..."""
    return [range(offset + s, offset + min(s + batch, n)) for s in range(0, n, batch)][rank::world_size]


def grid_labels(num_classes, per_class, max_rows=10):
    """Labels of a sample grid with one row per class (the first `max_rows` classes)."""
    return torch.arange(min(num_classes, max_rows)).repeat_interleave(per_class)


@torch.no_grad()
def generate(nnet, z, y, options, seed=0, first_index=0, autocast=contextlib.nullcontext):
    """Run `sde.sample` on the network from noise z (B, ...) with labels y (B,) or None; returns latents (fp32).
    The network runs inside `autocast()` (e.g. the launch's bf16 autocast), the sampler in fp32."""
    device = next(nnet.parameters()).device

    def eps_fn(x, t, labels):
        with autocast():
            return nnet(x, t.float(), labels).float()

    options = dict(options)
    if options['algorithm'] == 'euler_maruyama':
        options['generator'] = _generator(seed + 2, first_index)
    y = None if y is None else y.to(device)
    return sde.sample(eps_fn, z.to(device, torch.float32), y=y, **options)


@torch.no_grad()
def to_images(latents, autoencoder=None):
    """Latents -> images in [0, 1] (B, C, H, W): decoded by the autoencoder, or pixel space as is."""
    x = latents if autoencoder is None else autoencoder.decode(latents.to(next(autoencoder.parameters()).device))
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()
