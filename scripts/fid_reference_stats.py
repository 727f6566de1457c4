"""FID reference statistics (``mu``, ``sigma`` .npz, U-ViT's fid_stats format) of a set of images.

The images are a folder of PNG/JPG files or an ``.npz`` array: uint8 in [0,255] (as ADM's reference batches'
``arr_0``) or float in [0,1], laid out NHWC or NCHW with 3 channels.

    python scripts/fid_reference_stats.py VIRTUAL_imagenet256_labeled.npz assets/fid_stats/my_stats.npz
    python scripts/fid_reference_stats.py path/to/images/ assets/fid_stats/my_stats.npz --batch-size 100
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch
from tqdm import tqdm

from libs.fid import (activation_statistics, default_weights_path, folder_activations, load_inception,
                      save_statistics, tensor_activations)

log = logging.getLogger("fid_reference_stats")


def _as_nchw(images: np.ndarray, name: str) -> np.ndarray:
    """Check an image array and return it as NCHW (dtype unchanged)."""
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"{name}: expected images (N,H,W,3) or (N,3,H,W), got shape {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"{name}: expected uint8 or float images, got {images.dtype}")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name}: float images must lie in [0,1], found [{lo:g}, {hi:g}]")
    return images.transpose(0, 3, 1, 2) if images.shape[3] == 3 else images


def npz_activations(path: str, key: str, model, batch_size: int, progress: bool = True) -> np.ndarray:
    """(N,2048) activations of the image array ``key`` of an ``.npz`` file, converted batch by batch."""
    with np.load(path) as f:
        if key not in f:
            raise KeyError(f"{path} has no array {key!r} (it has {sorted(f.files)}); choose one with --key")
        images = _as_nchw(f[key], f"{path}[{key}]")
    acts = []
    with tqdm(total=len(images), desc="FID activations", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
            acts.append(tensor_activations(batch, model, batch_size, progress=False))
            bar.update(len(batch))
    return np.concatenate(acts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of PNG/JPG images, or .npz holding an image array")
    parser.add_argument("output", help="statistics file to write (.npz with mu and sigma)")
    parser.add_argument("--key", default="arr_0", help="array name inside an .npz input (default: %(default)s)")
    parser.add_argument("--weights", default=None,
                        help=f"FID Inception weights (default: {default_weights_path()})")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="image decoding processes for a folder input (default: min(8, CPU count))")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if not os.path.exists(args.images):
        raise FileNotFoundError(f"images not found: {args.images}")
    model = load_inception(args.weights, args.device)
    if os.path.isdir(args.images):
        acts = folder_activations(args.images, model, args.batch_size, args.num_workers)
    else:
        acts = npz_activations(args.images, args.key, model, args.batch_size)
    mu, sigma = activation_statistics(acts)
    save_statistics(args.output, mu, sigma)
    log.info("wrote FID reference statistics of %d images from %s to %s", len(acts), args.images,
             os.path.abspath(args.output))


if __name__ == "__main__":
    main()
