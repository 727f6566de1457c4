"""ImageNet train images -> autoencoder moments of each image and of its horizontal flip, one file per item.

    python scripts/extract_features.py assets/datasets/ImageNet assets/datasets/imagenet256_features
    python scripts/extract_features.py assets/datasets/ImageNet assets/datasets/imagenet512_features --resolution 512

Images are read as `libs.data.datasets.ImageNet` does (<root>/train/<wnid>/*.JPEG, ADM centre crop, label = index of the
sorted wnid) and encoded in fp32 with the KL-f8 autoencoder the official features came from (autoencoder_kl.pth).
Moments are [mean (4) | logvar (4)] of shape (8, res/8, res/8), float32.

Order: item i (in sorted file order) is written as index 2i and its flip as 2i + 1 (the official script puts a
flip B = 256 indices after its image within each batch). Training reads the files in any order
(`LatentFeatures` counts them), and an interrupted run leaves a contiguous prefix of indices.

Formats: `official` writes `{idx}.npy.npz` with arrays `z` (moments) and `label` (int64), as DiM's
imagenet{256,512}_features loaders read; `uvit` writes U-ViT's `{idx}.npy`, a pickled (moments, label) pair.
Resumable: only missing files are written (an image is encoded again if it or its flip is missing); every file
is written under a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch
from tqdm import tqdm

from libs.data.autoencoder import load_autoencoder
from libs.data.datasets import ImageNet

log = logging.getLogger('extract_features')
SUFFIX = {'official': '.npy.npz', 'uvit': '.npy'}


def write_item(folder, index, moments, label, fmt):
    """Write one item atomically: `{index}.npy.npz` (official) or `{index}.npy` (uvit)."""
    path = os.path.join(folder, f'{index}{SUFFIX[fmt]}')
    tmp = os.path.join(folder, f'.{index}.{os.getpid()}.tmp')
    with open(tmp, 'wb') as f:
        if fmt == 'official':
            np.savez(f, z=moments.astype(np.float32), label=np.int64(label))
        else:
            pair = np.empty(2, dtype=object)   # a ragged (array, int) pair must be an explicit object array
            pair[0], pair[1] = moments.astype(np.float32), np.int64(label)
            np.save(f, pair, allow_pickle=True)
    os.replace(tmp, path)


@torch.no_grad()
def extract(root, out, resolution=256, fmt='official', vae_path='assets/stable-diffusion/autoencoder_kl.pth',
            batch_size=64, num_workers=None, device=None, progress=True):
    """Write the moments of every image of <root>/train and of its flip to `out`; returns the number written."""
    if fmt not in SUFFIX:
        raise ValueError(f"format must be one of {sorted(SUFFIX)}, got {fmt!r}")
    vae = load_autoencoder(vae_path, device=device)      # checked before the (long) scan of the image tree
    dataset = ImageNet(root, resolution=resolution, random_flip=False)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):                          # leftovers of an interrupted write
        if name.startswith('.') and name.endswith('.tmp'):
            os.remove(os.path.join(out, name))
    existing = set(os.listdir(out))
    todo = [i for i in range(len(dataset)) if any(f'{k}{SUFFIX[fmt]}' not in existing for k in (2 * i, 2 * i + 1))]
    log.info('%d images in %d classes under %s/train at %dpx; %d already extracted, %d to go',
             len(dataset), dataset.num_classes, root, resolution, len(dataset) - len(todo), len(todo))
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=batch_size,
                                         num_workers=num_workers)
    device = next(vae.parameters()).device
    start, written = 0, 0
    for x, labels in tqdm(loader, desc='extract', unit='batch', disable=not progress, dynamic_ncols=True):
        x = x.to(device)
        moments = vae.encode_moments(torch.cat([x, x.flip(-1)])).float().cpu().numpy()   # images, then flips
        for k, (i, label) in enumerate(zip(todo[start:start + len(x)], labels.tolist())):
            for index, row in ((2 * i, k), (2 * i + 1, len(x) + k)):
                if f'{index}{SUFFIX[fmt]}' not in existing:
                    write_item(out, index, moments[row], label, fmt)
                    written += 1
        start += len(x)
    config = vae.vae.config
    side = resolution // 2 ** (len(config.block_out_channels) - 1)
    log.info('wrote %d files to %s; it holds %d items (%s format, moments %s)', written, os.path.abspath(out),
             2 * len(dataset), fmt, (2 * config.latent_channels, side, side))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', help='ImageNet folder holding train/<wnid>/*.JPEG')
    parser.add_argument('out', help='output folder of the feature files')
    parser.add_argument('--resolution', type=int, default=256, help='image size (default: %(default)s)')
    parser.add_argument('--format', choices=sorted(SUFFIX), default='official',
                        help='official {idx}.npy.npz or U-ViT {idx}.npy (default: %(default)s)')
    parser.add_argument('--vae', default='assets/stable-diffusion/autoencoder_kl.pth',
                        help='LDM-format KL-f8 autoencoder (default: %(default)s, as the official features)')
    parser.add_argument('--batch-size', type=int, default=64, help='images per batch (default: %(default)s)')
    parser.add_argument('--num-workers', type=int, default=None,
                        help='image decoding processes (default: min(8, CPU count))')
    parser.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    return extract(args.root, args.out, args.resolution, args.format, args.vae, args.batch_size, args.num_workers,
                   args.device)


if __name__ == '__main__':
    main()
