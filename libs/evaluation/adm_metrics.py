"""ADM's evaluation suite on FID-Inception features: Inception Score, sFID, improved precision / recall.

Defined as openai/guided-diffusion's ``evaluations/evaluator.py`` computes them (the numbers DiT, SiT, MDT and REPA
report), on the features of :meth:`libs.evaluation.fid.FIDInception.activations` (see there how they relate to the TF graph's):

- Inception Score: softmax over the 1008 bias-free logits, consecutive splits of 5,000 samples in index order
  (10 splits for 50,000 samples; a last shorter split is kept, as ADM does), mean over splits of
  exp(E_x KL(p(y|x) || p(y))). ADM computes it in float32; we use float64 in the log domain (log-softmax,
  log-sum-exp), so probabilities that underflow to 0 give no log(0).
- sFID: the Fréchet distance of the 2023-d spatial features against the reference's ``mu_s``/``sigma_s``.
- Precision / recall (Kynkäänniemi et al. 2019, k = 3): the radius of a point is the distance to its k-th nearest
  neighbour in its own set (the (k+1)-th smallest distance, the point itself counting as the first, as ADM and
  torch-fidelity); precision is the fraction of samples within (<=, ties count as inside) the radius of at least
  one reference point, recall the fraction of reference points within the radius of at least one sample. The
  reference set is the reference file's ``pr_features`` (ADM: the 10,000 images of its reference batch), the
  sample set all samples. Distances are squared Euclidean ||u||^2 - 2 u.v + ||v||^2 (clamped at 0) in float32
  on the given device, in row blocks; ADM computes the same expansion in float16 when finite (else float32),
  so its radii carry float16 rounding (about 1e-3 relative) that ours do not.

The reference file (written by scripts/fid_reference_stats.py) is an ``.npz`` with ``mu``, ``sigma`` (FID, as
U-ViT's fid_stats files, which stay valid), and optionally ``mu_s``, ``sigma_s`` (sFID; ADM's names, so ADM's
reference batches can be read) and ``pr_features`` (M, 2048) (precision / recall).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp

from libs.files import load_npz

from .fid import FEATURE_DIMS, STATS_SOURCE_HINT, activation_statistics, frechet_distance

__all__ = ['IS_SPLIT_SIZE', 'PR_NEIGHBOURS', 'PR_REFERENCE_SIZE', 'Reference', 'load_reference', 'save_reference',
           'inception_score', 'knn_radii', 'precision_recall', 'sample_metrics']

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_REFERENCE_SIZE = 10_000          # reference images kept for precision / recall (ADM's reference batches)
_BLOCK_ELEMENTS = 1 << 26           # distance block of at most 64 Mi float32 (256 MB)


@dataclass
class Reference:
    """What the metrics compare against; None where the file lacks it."""
    path: str
    mu: np.ndarray                          # (2048,)
    sigma: np.ndarray                       # (2048, 2048)
    mu_s: np.ndarray | None = None          # (2023,)
    sigma_s: np.ndarray | None = None       # (2023, 2023)
    pr_features: np.ndarray | None = None   # (M, 2048) float32


def _check_shape(path, name, array, shape):
    if array.shape != shape:
        raise ValueError(f"{path}: {name} has shape {array.shape}, expected {shape}")


def load_reference(path: str) -> Reference:
    """The reference file at ``path``: mu/sigma required, the other arrays read when present. A file numpy cannot
    read raises libs.files.UnreadableFile naming it (truncated, not an .npz archive)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics not found: {path}. {STATS_SOURCE_HINT}")
    with load_npz(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} lacks 'mu'/'sigma' arrays (it has {sorted(f.files)})")
        ref = Reference(path, f["mu"].astype(np.float64), f["sigma"].astype(np.float64))
        if ("mu_s" in f) != ("sigma_s" in f):
            raise ValueError(f"{path} holds only one of 'mu_s'/'sigma_s'")
        if "mu_s" in f:
            ref.mu_s, ref.sigma_s = f["mu_s"].astype(np.float64), f["sigma_s"].astype(np.float64)
        if "pr_features" in f:
            ref.pr_features = f["pr_features"].astype(np.float32)
    _check_shape(path, "sigma", ref.sigma, ref.mu.shape * 2)
    if ref.mu_s is not None:
        _check_shape(path, "mu_s", ref.mu_s, (FEATURE_DIMS["spatial"],))
        _check_shape(path, "sigma_s", ref.sigma_s, (FEATURE_DIMS["spatial"],) * 2)
    if ref.pr_features is not None:
        if ref.pr_features.ndim != 2 or ref.pr_features.shape[1] != FEATURE_DIMS["pool"]:
            raise ValueError(f"{path}: pr_features has shape {ref.pr_features.shape}, expected (M, 2048)")
    return ref


def save_reference(path: str, mu, sigma, mu_s=None, sigma_s=None, pr_features=None, pr_indices=None,
                   n_images: int | None = None) -> None:
    """Write a reference file exactly at ``path`` (no ``.npz`` appended), creating its folder; None arrays are
    left out. ``pr_indices``: which images (in input order) ``pr_features`` belong to; ``n_images``: how many
    images the statistics are over."""
    arrays = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pr_indices=pr_indices,
                  pr_features=None if pr_features is None else np.asarray(pr_features, np.float32),
                  n_images=None if n_images is None else np.int64(n_images))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})
    os.replace(tmp, path)


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of (N, C) logits (see the module docstring)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or not len(logits):
        raise ValueError(f"need logits of shape (N>=1, C), got {logits.shape}")
    log_p = log_softmax(logits, axis=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))      # log p(y), finite where p(y|x) underflows
        scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_marginal), axis=1))))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_norms: torch.Tensor) -> torch.Tensor:
    """(A, D), (B, D), (B,) -> (A, B) squared Euclidean distances, clamped at 0."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + b_norms).clamp_min_(0)


def _rows_per_block(columns: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, columns))


def knn_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS) -> torch.Tensor:
    """(N, D) float32 -> (N,) squared distance of each point to its k-th nearest neighbour in the set."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(features)}")
    norms = (features * features).sum(1)
    block = _rows_per_block(len(features))
    return torch.cat([torch.kthvalue(_squared_distances(features[i:i + block], features, norms), k + 1, dim=1).values
                      for i in range(0, len(features), block)])


def precision_recall(reference_features, sample_features, k: int = PR_NEIGHBOURS,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """Improved precision and recall of samples (N, D) against reference points (M, D), computed on ``device``."""
    ref = torch.as_tensor(np.asarray(reference_features), dtype=torch.float32, device=device)
    gen = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"feature sets differ in layout: reference {tuple(ref.shape)}, samples {tuple(gen.shape)}")
    ref_radii, gen_radii = knn_radii(ref, k), knn_radii(gen, k)
    ref_norms = (ref * ref).sum(1)
    gen_inside = torch.zeros(len(gen), dtype=torch.bool, device=device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    block = _rows_per_block(len(ref))
    for i in range(0, len(gen), block):
        d = _squared_distances(gen[i:i + block], ref, ref_norms)                     # (b, M)
        gen_inside[i:i + block] = (d <= ref_radii).any(dim=1)
        ref_inside |= (d <= gen_radii[i:i + block, None]).any(dim=0)
    return gen_inside.double().mean().item(), ref_inside.double().mean().item()


def sample_metrics(features: dict[str, np.ndarray], reference: Reference,
                   device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, str]]:
    """All metrics of the suite that ``features`` ({'pool', 'spatial', 'logits'}: (N, D) each, in sample order)
    and ``reference`` allow: ({'fid', 'sfid', 'inception_score', 'precision', 'recall'}, {name: why not})."""
    metrics, unavailable = {}, {}
    metrics["fid"] = frechet_distance(*activation_statistics(features["pool"]), reference.mu, reference.sigma)
    remake = "remake it with scripts/fid_reference_stats.py to get {}"
    if reference.mu_s is None:
        unavailable["sfid"] = f"{reference.path} has no spatial statistics (mu_s, sigma_s); " + remake.format("sFID")
    else:
        metrics["sfid"] = frechet_distance(*activation_statistics(features["spatial"]), reference.mu_s,
                                           reference.sigma_s)
    metrics["inception_score"] = inception_score(features["logits"])
    n = len(features["pool"])
    if reference.pr_features is None:
        why = f"{reference.path} has no pr_features (reference pool features); " + remake.format("them")
    elif min(n, len(reference.pr_features)) <= PR_NEIGHBOURS:
        why = (f"needs more than k={PR_NEIGHBOURS} samples and reference points, got {n} and "
               f"{len(reference.pr_features)}")
    else:
        metrics["precision"], metrics["recall"] = precision_recall(reference.pr_features, features["pool"],
                                                                   device=device)
        why = None
    if why:
        unavailable.update(precision=why, recall=why)
    return metrics, unavailable
