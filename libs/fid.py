"""FID with pytorch-fid's Inception network (TF-ported FID weights), loaded from a local file only.

Features are the 2048-d final average pool of ``pytorch_fid.inception.InceptionV3([3])``; statistics are
(mu, sigma) in float64 as in U-ViT's ``fid_stats_*.npz`` files; the distance is pytorch-fid's.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from pytorch_fid.inception import (FID_WEIGHTS_URL, FIDInceptionA, FIDInceptionC, FIDInceptionE_1,
                                   FIDInceptionE_2)
from scipy import linalg
from scipy.linalg import lapack
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
STATS_SOURCE_HINT = (
    "U-ViT's reference statistics are in the fid_stats/ folder of its Google Drive "
    "(https://drive.google.com/drive/folders/1yo-XhqbPue3rp5P57j6QbA5QZx6KybvP, linked from the README of "
    "https://github.com/baofff/U-ViT); put that folder at assets/fid_stats/, or compute statistics with "
    "scripts/fid_reference_stats.py"
)
# Layers of torchvision's Inception3 that pytorch-fid chains for block 3 (input -> final average pool).
_FEATURE_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                   "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                   "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")


def default_weights_path() -> str:
    """Where pytorch-fid caches the FID Inception weights: ``<torch hub dir>/checkpoints/pt_inception-...pth``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))


def fid_inception_v3() -> torchvision.models.Inception3:
    """pytorch-fid's FID Inception architecture (``fid_inception_v3()`` without its weight download)."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class FIDInception(nn.Module):
    """Images (B,3,H,W) in [0,1] -> (B,2048) pool features, computed as pytorch-fid's ``InceptionV3([3])``."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        net = fid_inception_v3()
        net.load_state_dict(state_dict, strict=True)
        self.features = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in _FEATURE_LAYERS))
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.features(2 * x - 1).flatten(1)


def load_inception(path: str | None = None, device: torch.device | str | None = None) -> FIDInception:
    """FID Inception from a local weights file (default: :func:`default_weights_path`); never downloads."""
    path = os.fspath(path) if path is not None else default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found: {path}. Download {FID_WEIGHTS_URL} "
                                f"(about 96 MB) to that path, or pass the location of your copy")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model = FIDInception(state_dict)
    except RuntimeError as e:
        raise ValueError(f"{path} does not hold pytorch-fid's FID Inception weights: {e}") from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)


def image_files(folder: str) -> list[str]:
    """Sorted paths of the PNG/JPG images directly inside ``folder``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {folder}")
    return files


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            return to_tensor(img.convert("RGB"))


def _activations(model: FIDInception, batches, n: int, n_batches: int, progress: bool) -> np.ndarray:
    device = next(model.parameters()).device
    out = np.empty((n, 2048), dtype=np.float64)
    start = 0
    for batch in tqdm(batches, total=n_batches, desc="FID activations", unit="batch", disable=not progress):
        feats = model(batch.to(device, torch.float32)).cpu().numpy()
        out[start:start + len(feats)] = feats
        start += len(feats)
    return out


def folder_activations(folder: str, model: FIDInception, batch_size: int = 50, num_workers: int | None = None,
                       progress: bool = True) -> np.ndarray:
    """(N,2048) float64 activations of the N images in ``folder`` (PIL -> RGB -> [0,1]); all images the same size.

    ``num_workers`` (image decoding processes) defaults to min(8, CPU count).
    """
    files = image_files(folder)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(_ImageFiles(files), batch_size=batch_size, num_workers=num_workers)
    return _activations(model, loader, len(files), len(loader), progress)


def tensor_activations(images: torch.Tensor, model: FIDInception, batch_size: int = 50,
                       progress: bool = True) -> np.ndarray:
    """(N,2048) float64 activations of float images (N,3,H,W) in [0,1]."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"expected float images (N,3,H,W) in [0,1], got {images.dtype} {tuple(images.shape)}")
    batches = images.split(batch_size)
    return _activations(model, batches, len(images), len(batches), progress)


def activation_statistics(act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,D) activations -> mu (D,), sigma (D,D), float64 (``np.cov`` with rowvar=False)."""
    act = np.asarray(act, dtype=np.float64)
    if act.ndim != 2 or len(act) < 2:
        raise ValueError(f"need activations of shape (N>=2, D), got {act.shape}")
    return act.mean(axis=0), np.cov(act, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrtm(sigma1 sigma2) of two symmetric PSD (D,D) matrices, exactly, without a general matrix sqrt.

    With sigma1 = F F^T (pivoted Cholesky, F of shape (D, rank)), sigma1 sigma2 has the same nonzero eigenvalues
    as the symmetric PSD matrix F^T sigma2 F, and Tr sqrtm(A) is the sum of the square roots of A's eigenvalues.
    Eigenvalues below -1e-6 * max(1, largest) mean an input is not PSD (ValueError); smaller negative ones are
    rounding and count as 0. For D = 2048 about 1-2 s on 2 CPU cores, against 12-80 s for scipy's sqrtm.
    """
    c, piv, rank, info = lapack.dpstrf(sigma1, lower=1)  # P^T sigma1 P = L L^T; stops at rank (info > 0)
    if info < 0:
        raise ValueError(f"FID: pivoted Cholesky failed (LAPACK info {info})")
    factor = np.empty((len(sigma1), rank))
    factor[piv - 1] = np.tril(c)[:, :rank]
    eigvals = linalg.eigh(factor.T @ sigma2 @ factor, eigvals_only=True) if rank else np.zeros(1)
    if eigvals.min() < -1e-6 * max(1.0, eigvals.max()):
        raise ValueError(f"FID: sigma1 sigma2 has a negative eigenvalue {eigvals.min():g}; the statistics "
                         "are not covariance matrices")
    return float(np.sqrt(np.clip(eigvals, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1-mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)): pytorch-fid's distance, computed exactly
    from symmetric eigenvalues (:func:`_trace_sqrt_product`) instead of scipy's sqrtm.

    A non-finite trace is retried with ``eps`` added to both diagonals, as pytorch-fid does; still non-finite
    raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2  # np.cov is symmetric up to rounding
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    if not np.isfinite(tr_covmean):
        log.warning("FID: non-finite Tr sqrtm(sigma1 sigma2); adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    fid = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if not np.isfinite(fid):
        raise ValueError("FID: the statistics hold non-finite values")
    return fid


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mu (D,) and sigma (D,D) from a reference ``.npz`` (U-ViT's fid_stats format)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics not found: {path}. {STATS_SOURCE_HINT}")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} lacks 'mu'/'sigma' arrays (it has {sorted(f.files)})")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu`` and ``sigma`` to ``path`` exactly (no ``.npz`` appended), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def fid_from_folder(folder: str, ref_stats_path: str, weights_path: str | None = None, batch_size: int = 50,
                    device: torch.device | str | None = None, num_workers: int | None = None,
                    progress: bool = True) -> float:
    """FID of the images in ``folder`` against reference statistics (checked before any image is read)."""
    mu_ref, sigma_ref = load_statistics(ref_stats_path)
    model = load_inception(weights_path, device)
    mu, sigma = activation_statistics(folder_activations(folder, model, batch_size, num_workers, progress))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
