"""Reference file of a set of images for FID and the rest of ADM's suite (libs/evaluation/adm_metrics.py).

The images are a folder of PNG/JPG files (all one size) or an ``.npz`` array: uint8 in [0,255] (as ADM's reference
batches' ``arr_0``) or float in [0,1], laid out NHWC or NCHW with 3 channels. The output ``.npz`` holds ``mu``,
``sigma`` (FID; U-ViT's fid_stats format), ``mu_s``, ``sigma_s`` (sFID), ``pr_features`` (float32 pool features of
``--pr-subset`` images drawn without replacement with ``--seed``, or of all if fewer; precision / recall),
``pr_indices`` (which images, in input order) and ``n_images``. Statistics are accumulated batch by batch, so the
memory does not grow with the number of images.

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

from libs.evaluation.adm_metrics import PR_REFERENCE_SIZE, save_reference
from libs.evaluation.fid import StreamingMoments, default_weights_path, folder_loader, load_inception
from libs.files import load_npz

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


def npz_batches(path: str, key: str, batch_size: int):
    """(number of images, iterator of float (B,3,H,W) batches in [0,1]) of the array ``key`` of an ``.npz``."""
    with load_npz(path) as f:                     # an unreadable file is named with what is wrong
        if key not in f:
            raise KeyError(f"{path} has no array {key!r} (it has {sorted(f.files)}); choose one with --key")
        images = _as_nchw(f[key], f"{path}[{key}]")

    def batches():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            yield batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
    return len(images), batches()


def reference_arrays(model, n: int, batches, pr_subset: int, seed: int, progress: bool = True) -> dict:
    """The reference file's arrays from ``n`` images given as float batches (B,3,H,W) in [0,1]."""
    if pr_subset < 1:
        raise ValueError(f"--pr-subset must be >= 1, got {pr_subset}")
    pr_indices = (np.arange(n) if n <= pr_subset else
                  np.sort(np.random.default_rng(seed).choice(n, pr_subset, replace=False)))
    keep = np.zeros(n, dtype=bool)
    keep[pr_indices] = True
    pool, spatial, pr_rows = StreamingMoments(), StreamingMoments(), []
    device, start = model.logit_weight.device, 0
    with tqdm(total=n, desc="Inception features", unit="img", disable=not progress) as bar:
        for batch in batches:
            features = {k: v.cpu().numpy() for k, v in model.activations(batch.to(device)).items()}
            pool.update(features["pool"])
            spatial.update(features["spatial"])
            pr_rows.append(features["pool"][keep[start:start + len(batch)]])
            start += len(batch)
            bar.update(len(batch))
    if start != n:
        raise RuntimeError(f"read {start} images, expected {n}")
    (mu, sigma), (mu_s, sigma_s) = pool.statistics(), spatial.statistics()
    return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pr_features=np.concatenate(pr_rows),
                pr_indices=pr_indices, n_images=n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of PNG/JPG images, or .npz holding an image array")
    parser.add_argument("output", help="reference file to write (.npz)")
    parser.add_argument("--key", default="arr_0", help="array name inside an .npz input (default: %(default)s)")
    parser.add_argument("--weights", default=None,
                        help=f"FID Inception weights (default: {default_weights_path()})")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="image decoding processes for a folder input (default: min(8, CPU count))")
    parser.add_argument("--pr-subset", type=int, default=PR_REFERENCE_SIZE,
                        help="images whose pool features are kept for precision / recall (default: %(default)s, "
                             "as ADM's reference batches)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the precision / recall subset (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if not os.path.exists(args.images):
        raise FileNotFoundError(f"images not found: {args.images}")
    model = load_inception(args.weights, args.device)
    if os.path.isdir(args.images):
        loader = folder_loader(args.images, args.batch_size, args.num_workers)
        n, batches = len(loader.dataset), loader
    else:
        n, batches = npz_batches(args.images, args.key, args.batch_size)
    arrays = reference_arrays(model, n, batches, args.pr_subset, args.seed)
    save_reference(args.output, **arrays)
    log.info("wrote the reference file of %d images from %s (mu, sigma, mu_s, sigma_s; pool features of %d for "
             "precision / recall) to %s", n, args.images, len(arrays["pr_features"]), os.path.abspath(args.output))


if __name__ == "__main__":
    main()
