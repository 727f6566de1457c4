"""Reference file of a set of images for FID and the rest of ADM's suite (libs/evaluation/adm_metrics.py).

The images are a folder of PNG/JPG files (all one size), an image folder read as the ``image_folder`` data set reads
it (``--resolution R``: class subfolders or images only, any sizes, ADM centre crop at R, the pixels training sees
before flips; files that cannot be read are skipped, named in the log and counted), or an ``.npz`` array: uint8 in
[0,255] (as ADM's reference batches' ``arr_0``) or float in [0,1], laid out NHWC or NCHW with 3 channels. The output ``.npz`` holds ``mu``,
``sigma`` (FID; U-ViT's fid_stats format), ``mu_s``, ``sigma_s`` (sFID), ``pr_features`` (float32 pool features of
``--pr-subset`` images drawn without replacement with ``--seed``, or of all if fewer; precision / recall),
``pr_indices`` (which images, in input order) and ``n_images``. Statistics are accumulated batch by batch, so the
memory does not grow with the number of images.

    python scripts/fid_reference_stats.py VIRTUAL_imagenet256_labeled.npz assets/fid_stats/my_stats.npz
    python scripts/fid_reference_stats.py path/to/images/ assets/fid_stats/my_stats.npz --batch-size 100
    python scripts/fid_reference_stats.py path/to/my_images assets/fid_stats/my_images256.npz --resolution 256
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch
from tqdm import tqdm

from libs.data.image_folder import CheckedImages, ImageFolder
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
            yield (np.arange(start, start + len(batch)),
                   batch.float() / 255 if batch.dtype == torch.uint8 else batch.float())
    return len(images), batches()


def numbered(loader):
    """(input positions, batch) pairs of a loader of whole batches."""
    start = 0
    for batch in loader:
        yield np.arange(start, start + len(batch)), batch
        start += len(batch)


def image_folder_batches(path: str, resolution: int, batch_size: int, num_workers: int | None):
    """(number of image files, iterator of (positions, float (B,3,R,R) batches in [0,1])) of the image folder
    `path` read as the ``image_folder`` data set reads it; files that cannot be decoded are left out, each named
    in the log."""
    folder = ImageFolder(path, resolution, random_flip=False)
    for level, message in folder.notes:
        log.log(level, message)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(CheckedImages(folder), batch_size=batch_size, num_workers=num_workers)

    def batches():
        start = 0
        for pixels, _, errors in loader:
            for error in filter(None, errors):
                log.warning("skipped %s", error)
            good = [k for k, error in enumerate(errors) if not error]
            if good:
                yield start + np.array(good), pixels[good].float() / 255     # the uint8 pixels a PNG would hold
            start += len(pixels)
    return len(folder), batches()


def reference_arrays(model, n: int, batches, pr_subset: int, seed: int, progress: bool = True) -> dict:
    """The reference file's arrays from ``batches`` of (input positions, float images (B,3,H,W) in [0,1]) out of
    ``n`` input images; positions that no batch holds (files that could not be read) are left out of everything."""
    if pr_subset < 1:
        raise ValueError(f"--pr-subset must be >= 1, got {pr_subset}")
    pr_indices = (np.arange(n) if n <= pr_subset else
                  np.sort(np.random.default_rng(seed).choice(n, pr_subset, replace=False)))
    keep = np.zeros(n, dtype=bool)
    keep[pr_indices] = True
    pool, spatial, pr_rows, pr_present = StreamingMoments(), StreamingMoments(), [], []
    device, count = model.logit_weight.device, 0
    with tqdm(total=n, desc="Inception features", unit="img", disable=not progress) as bar:
        for positions, batch in batches:
            features = {k: v.cpu().numpy() for k, v in model.activations(batch.to(device)).items()}
            pool.update(features["pool"])
            spatial.update(features["spatial"])
            pr_rows.append(features["pool"][keep[positions]])
            pr_present.append(positions[keep[positions]])
            count += len(batch)
            bar.update(len(batch))
    if count < 2:
        raise ValueError(f"read {count} of {n} images: the statistics need at least 2")
    (mu, sigma), (mu_s, sigma_s) = pool.statistics(), spatial.statistics()
    return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pr_features=np.concatenate(pr_rows),
                pr_indices=np.concatenate(pr_present), n_images=count)


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
    parser.add_argument("--resolution", type=int, default=None,
                        help="read the folder as the image_folder data set does, at this resolution (class "
                             "subfolders or images only, any sizes, ADM centre crop)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if not os.path.exists(args.images):
        raise FileNotFoundError(f"images not found: {args.images}")
    model = load_inception(args.weights, args.device)
    if os.path.isdir(args.images) and args.resolution is not None:
        n, batches = image_folder_batches(args.images, args.resolution, args.batch_size, args.num_workers)
    elif os.path.isdir(args.images):
        try:
            loader = folder_loader(args.images, args.batch_size, args.num_workers)
        except ValueError as e:
            raise ValueError(f"{e}; for class subfolders or images of several sizes, give --resolution R (read as "
                             "the image_folder data set reads it)") from None
        n, batches = len(loader.dataset), numbered(loader)
    elif args.resolution is not None:
        raise ValueError(f"--resolution reads an image folder; {args.images} is a file")
    else:
        n, batches = npz_batches(args.images, args.key, args.batch_size)
    arrays = reference_arrays(model, n, batches, args.pr_subset, args.seed)
    save_reference(args.output, **arrays)
    log.info("wrote the reference file of %d images from %s (mu, sigma, mu_s, sigma_s; pool features of %d for "
             "precision / recall) to %s%s", arrays["n_images"], args.images, len(arrays["pr_features"]),
             os.path.abspath(args.output), f"; {n - arrays['n_images']} image files skipped (named above)"
             if arrays["n_images"] < n else "")


if __name__ == "__main__":
    main()
