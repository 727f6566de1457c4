"""Scoring generated images in memory on every process: Inception features by sample index, then ADM's suite.

    scorer = SampleScorer(load_inception(path, device), n_samples)
    for indices, images in my_share_of_the_samples:      # any process, any device; uint8 or float in [0, 1]
        scorer.add(images, indices)
    metrics, unavailable = scorer.score(load_reference(stats_path))   # a collective call: every process

Each process adds the images it made; :meth:`SampleScorer.gather` (collective) returns every sample's features in
sample-index order on every process, and :meth:`SampleScorer.score` computes the metrics from those identical arrays
on every process, so no process waits for another's computation and the result is the same whatever the process
count. An image's activations can depend in the last bits on the batch it goes through, so for bitwise-equal results
across process counts feed the same batches (e.g. fixed chunks of sample indices) on the same kind of device with
the same thread count.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .adm_metrics import Reference, sample_metrics
from .fid import FEATURE_DIMS, FIDInception

__all__ = ['to_uint8', 'SampleScorer']


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [0, 1] -> uint8 as the sample PNGs are written (torchvision's ``save_image``:
    x * 255 + 0.5, clamped, truncated); uint8 images are returned as they are."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    return images.float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SampleScorer:
    """Collects the FID-Inception features (pool 2048, spatial 2023, logits 1008) of images of samples 0..n-1."""

    def __init__(self, inception: FIDInception, n_samples: int):
        if n_samples < 1:
            raise ValueError(f"n_samples={n_samples} must be >= 1")
        self.inception, self.n = inception, int(n_samples)
        self.device = next(inception.buffers()).device
        self._indices: list[int] = []
        self._features: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURE_DIMS}

    def __len__(self) -> int:
        """Images added on this process."""
        return len(self._indices)

    @torch.no_grad()
    def add(self, images: torch.Tensor, indices) -> None:
        """Features of images (B, 1 or 3, H, W) (uint8, or float in [0, 1], quantised by :func:`to_uint8` as the
        PNGs are) of the samples ``indices`` (B ints in [0, n)); one device-to-host copy per call."""
        images, indices = to_uint8(images), [int(i) for i in indices]
        if len(indices) != len(images):
            raise ValueError(f"{len(images)} images but {len(indices)} indices")
        if any(not 0 <= i < self.n for i in indices):
            raise ValueError(f"sample indices must lie in [0, {self.n}), got {indices}")
        x = images.to(self.device, non_blocking=True).expand(-1, 3, -1, -1).float() / 255
        for kind, value in self.inception.activations(x).items():
            self._features[kind].append(value.cpu())
        self._indices.extend(indices)

    def gather(self) -> dict[str, np.ndarray]:
        """{'pool': (n, 2048), 'spatial': (n, 2023), 'logits': (n, 1008)} float32, row i = sample i, on every
        process (a collective call when torch.distributed is initialised). Raises, on every process alike,
        unless each sample was added exactly once over all processes."""
        indices = torch.tensor(self._indices, dtype=torch.int64)
        features = {k: torch.cat(v) if v else torch.empty(0, FEATURE_DIMS[k]) for k, v in self._features.items()}
        if _world_size() > 1:
            indices = self._all_gather(indices)
            features = {k: self._all_gather(v) for k, v in features.items()}
        order = torch.argsort(indices, stable=True)
        if not torch.equal(indices[order], torch.arange(self.n)):
            counts = torch.bincount(indices, minlength=self.n)
            missing, repeated = torch.nonzero(counts == 0).flatten(), torch.nonzero(counts > 1).flatten()
            raise RuntimeError(f"features of samples 0..{self.n - 1}: {len(missing)} missing "
                               f"({missing[:5].tolist()}...), {len(repeated)} added more than once "
                               f"({repeated[:5].tolist()}...)")
        return {k: v[order].numpy() for k, v in features.items()}

    def _all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenation over processes (rank order) of each process's rows; row counts may differ."""
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        count = torch.tensor([len(local)], device=device)
        counts = [torch.zeros_like(count) for _ in range(_world_size())]
        dist.all_gather(counts, count)
        counts = [int(c) for c in counts]
        padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:c].cpu() for part, c in zip(parts, counts)])

    def score(self, reference: Reference) -> tuple[dict[str, float], dict[str, str]]:
        """Gathers (collective) and returns :func:`libs.evaluation.adm_metrics.sample_metrics` of all samples, on every process."""
        return sample_metrics(self.gather(), reference, self.device)
