"""FID with pytorch-fid's Inception network (TF-ported FID weights), loaded from a local file only.

Features are the 2048-d final average pool of ``pytorch_fid.inception.InceptionV3([3])``; statistics are
(mu, sigma) in float64 as in U-ViT's ``fid_stats_*.npz`` files; the distance is pytorch-fid's.
:meth:`FIDInception.activations` also gives the features of the rest of ADM's suite (libs/evaluation/adm_metrics.py):
the sFID spatial features and the 1008 Inception-Score logits, in the same forward pass.
"""
from __future__ import annotations

import contextlib
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

from libs.files import load_torch_file

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


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """No autocast and, on CUDA, no TF32 matmuls/convolutions (restored after): Inception features in true float32
    whatever the launch's precision settings."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


SPATIAL_CHANNELS, SPATIAL_SIZE = 7, 17      # sFID: the first 7 channels of a 17x17 map -> 2023 features
FEATURE_DIMS = {"pool": 2048, "spatial": SPATIAL_CHANNELS * SPATIAL_SIZE ** 2, "logits": 1008}
_SPATIAL_BLOCK = "Mixed_6d"


class FIDInception(nn.Module):
    """Images (B,3,H,W) in [0,1] -> (B,2048) pool features, computed as pytorch-fid's ``InceptionV3([3])``.

    :meth:`activations` returns, from one pass, the features of ADM's ``evaluations/evaluator.py`` (TF graph
    ``classify_image_graph_def.pb``, the graph these weights were ported from):

    - ``pool`` (B, 2048): TF ``pool_3:0``, the FID features.
    - ``spatial`` (B, 2023): TF ``mixed_6/conv:0[..., :7]``, the sFID features. The TF graph's 11 mixed blocks
      ``mixed, mixed_1, ..., mixed_10`` are torchvision's ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c`` in
      order (equal channel counts and grid sizes block by block; TF-to-PyTorch weight converters map
      ``mixed_6/conv/{conv2d_params,batchnorm}`` to ``Mixed_6d.branch1x1.{conv,bn}``), and the node
      ``mixed_6/conv`` is the ReLU closing that 1x1 conv -> batch norm -> ReLU (its ops are
      ``mixed_6/conv/Conv2D`` and ``mixed_6/conv/batchnorm``). So this is the **post-ReLU** output of
      ``Mixed_6d.branch1x1``, 192 x 17 x 17 at 299 px, of which the first 7 channels (output channels keep
      their order through the HWIO -> OIHW weight port) are flattened as TF flattens NHWC: (h, w, c), c fastest.
      Confidence: high for the layer and the channel order (read from the graph's names and converters), not
      checked against TensorFlow here (it cannot run here). The FID of these features is invariant to the
      flattening order; the order only matters to compare ``mu_s``/``sigma_s`` with ADM's reference files.
    - ``logits`` (B, 1008): ``pool @ fc.weight.T`` without ``fc.bias``, as ADM's Inception Score (the TF
      ``softmax/logits/MatMul`` weight, no bias; torch-fidelity's ``logits_unbiased``). ``fc`` holds the TF
      graph's ``softmax/weights``, whose 1008 outputs ADM's softmax takes all of, and so do we.

    The input pipeline is pytorch-fid's (bilinear resize with half-pixel centres, then 2x - 1), not the TF
    graph's (TF1 ``ResizeBilinear`` without half-pixel centres, then (x - 128) / 128), so every feature is close
    to ADM's but not bit-equal (pytorch-fid's README: FID 0.08 absolute / 0.0009 relative apart from TF's on
    LSUN ProGAN samples). For ADM's exact numbers, export the samples (eval_ldm_discrete.py --npz) and run ADM's
    evaluator on them.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        net = fid_inception_v3()
        net.load_state_dict(state_dict, strict=True)
        self.features = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in _FEATURE_LAYERS))
        self.register_buffer("logit_weight", net.fc.weight.detach().clone())     # (1008, 2048)
        self._spatial_at = _FEATURE_LAYERS.index(_SPATIAL_BLOCK)
        # Channels-last convolutions: 1.6-2.1x faster than NCHW on a 2-vCPU AMD EPYC (benchmarks/inception.py).
        self.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _prepare(x: torch.Tensor) -> torch.Tensor:
        # One memory layout whatever the caller's (a permuted HWC tensor is already channels-last), so that the
        # same pixels always meet the same kernels: bitwise-equal features from memory and from files.
        x = F.interpolate(x.float().contiguous(), size=(299, 299), mode="bilinear", align_corners=False)
        return (2 * x - 1).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_fp32(x.device):
            return self.features(self._prepare(x)).flatten(1)

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images (B,3,H,W) in [0,1] -> {'pool': (B,2048), 'spatial': (B,2023), 'logits': (B,1008)}, fp32."""
        with full_fp32(x.device):
            h = self.features[:self._spatial_at](self._prepare(x))
            spatial = getattr(self.features, _SPATIAL_BLOCK).branch1x1(h)[:, :SPATIAL_CHANNELS]
            pool = self.features[self._spatial_at:](h).flatten(1)
            return {"pool": pool, "spatial": spatial.permute(0, 2, 3, 1).flatten(1),
                    "logits": pool @ self.logit_weight.T}


def load_inception(path: str | None = None, device: torch.device | str | None = None) -> FIDInception:
    """FID Inception from a local weights file (default: :func:`default_weights_path`); never downloads."""
    path = os.fspath(path) if path is not None else default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found: {path}. Download {FID_WEIGHTS_URL} "
                                f"(about 96 MB) to that path, or pass the location of your copy")
    state_dict = load_torch_file(path)
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


def folder_loader(folder: str, batch_size: int = 50, num_workers: int | None = None) -> torch.utils.data.DataLoader:
    """Batches (B,3,H,W) in [0,1] of the images in ``folder`` in :func:`image_files` order (PIL -> RGB ->
    ``to_tensor``); all images the same size. ``num_workers`` (decoding processes) defaults to min(8, CPUs)."""
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(_ImageFiles(image_files(folder)), batch_size=batch_size,
                                       num_workers=num_workers)


def activation_statistics(act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,D) activations -> mu (D,), sigma (D,D), float64 (``np.cov`` with rowvar=False)."""
    act = np.asarray(act, dtype=np.float64)
    if act.ndim != 2 or len(act) < 2:
        raise ValueError(f"need activations of shape (N>=2, D), got {act.shape}")
    return act.mean(axis=0), np.cov(act, rowvar=False)


class StreamingMoments:
    """Mean and covariance of (N, D) rows fed in batches, in float64, with memory independent of N.

    Sums are taken about the first batch's mean (a shift that keeps the covariance free of cancellation);
    the result equals :func:`activation_statistics` of all rows up to rounding (``np.cov`` normalisation, N-1).
    """

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or not len(rows):
            raise ValueError(f"need a non-empty (B, D) batch, got shape {rows.shape}")
        if self.shift is None:
            self.shift = rows.mean(axis=0)
            self.sum, self.outer = np.zeros_like(self.shift), np.zeros((len(self.shift),) * 2)
        centred = rows - self.shift
        self.n += len(rows)
        self.sum += centred.sum(axis=0)
        self.outer += centred.T @ centred

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """mu (D,), sigma (D, D), float64."""
        if self.n < 2:
            raise ValueError(f"need activations of at least 2 images, got {self.n}")
        mean = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return self.shift + mean, (sigma + sigma.T) / 2


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
