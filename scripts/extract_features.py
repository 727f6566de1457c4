"""An image folder -> autoencoder moments of each image and of its horizontal flip, one file per item, and the
folder's classes.json.

    python scripts/extract_features.py path/to/my_images assets/datasets/my_images_features256
    python scripts/extract_features.py assets/datasets/ImageNet/train assets/datasets/imagenet256_features
    python scripts/extract_features.py assets/datasets/ImageNet/train assets/datasets/imagenet512_features --resolution 512

Images are read as the `image_folder` data set reads them (libs/data/image_folder.py: <folder>/<class>/**/<image>,
classes = the sorted subfolder names, or images only for unconditional data; ADM centre crop at --resolution).
ImageNet's train folder (<wnid>/<wnid>_*.JPEG) gives the labels of the `imagenet` data set (the sorted wnids), in
the same file order. Encoded in fp32 with the KL-f8 autoencoder the official features came from
(autoencoder_kl.pth). Moments are [mean (4) | logvar (4)] of shape (8, res/8, res/8), float32.

Order: item i (in sorted file order) is written as index 2i and its flip as 2i + 1 (the official script puts a
flip B = 256 indices after its image within each batch). Training reads the files in any order (`LatentFeatures`
lists them).

Formats: `official` writes `{idx}.npy.npz` with arrays `z` (moments) and `label` (int64), as DiM's
imagenet{256,512}_features loaders read; `uvit` writes U-ViT's `{idx}.npy`, a pickled (moments, label) pair.
classes.json: {"num_classes", "classes", "source", "resolution"}, written first (the `features` data set reads the
class count and names from it), then "items" (feature files in the folder) and "skipped" (the image files that
could not be read, with the reason) when the extraction ends.

Bad files: a file that is not an image is skipped by the folder scan; a file whose data cannot be decoded (a
truncated JPEG) is skipped when read, and its two indices stay free. Each is named in the log, counted at the
end and listed in classes.json.
Resumable: only missing files are written (an image is encoded again if it or its flip is missing, and a skipped
one is tried again); every file is written under a temporary name, then renamed. A folder holding the features of
other classes or another resolution is refused.
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch
from tqdm import tqdm

from libs.data.autoencoder import load_autoencoder
from libs.data.image_folder import (CLASSES_FILE, CheckedImages, ImageFolder, read_class_record,
                                    write_class_record)

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


def _start_record(out, record):
    """Write classes.json into `out`, or check the one of an earlier extraction against `record`."""
    path = os.path.join(out, CLASSES_FILE)
    if os.path.isfile(path):
        before = read_class_record(path)
        for key in ('classes', 'resolution'):
            if before.get(key) != record[key]:
                raise ValueError(f"{out} holds features of other {key} ({path}: {before.get(key)!r:.200}; this "
                                 f"extraction: {record[key]!r:.200}): choose another output folder")
    write_class_record(out, record)


@torch.no_grad()
def extract(images, out, resolution=256, fmt='official', vae_path='assets/stable-diffusion/autoencoder_kl.pth',
            batch_size=64, num_workers=None, device=None, progress=True):
    """Write the moments of every image of the folder `images` and of its flip to `out`, and out/classes.json;
    returns the number of feature files written."""
    if fmt not in SUFFIX:
        raise ValueError(f"format must be one of {sorted(SUFFIX)}, got {fmt!r}")
    vae = load_autoencoder(vae_path, device=device)      # checked before the (long) scan of the image tree
    folder = ImageFolder(images, resolution, random_flip=False)
    for level, message in folder.notes:
        log.log(level, message)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):                          # leftovers of an interrupted write
        if name.startswith('.') and name.endswith('.tmp'):
            os.remove(os.path.join(out, name))
    record = dict(folder.record(), resolution=resolution)
    _start_record(out, record)
    existing = set(os.listdir(out))
    todo = [i for i in range(len(folder)) if any(f'{k}{SUFFIX[fmt]}' not in existing for k in (2 * i, 2 * i + 1))]
    log.info('%d images in %d classes under %s at %dpx; %d already extracted, %d to go',
             len(folder), folder.num_classes, images, resolution, len(folder) - len(todo), len(todo))
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(CheckedImages(folder), todo), batch_size=batch_size,
                                         num_workers=num_workers)
    device = next(vae.parameters()).device
    start, written, damaged = 0, 0, []
    for pixels, labels, errors in tqdm(loader, desc='extract', unit='batch', disable=not progress, dynamic_ncols=True):
        batch = todo[start:start + len(pixels)]
        start += len(pixels)
        for error in filter(None, errors):
            log.warning('skipped %s', error)
            damaged.append(error)
        good = [k for k, error in enumerate(errors) if not error]
        if not good:
            continue
        x = pixels[good].to(device).float() / 127.5 - 1          # as the data sets' items, in [-1, 1]
        moments = vae.encode_moments(torch.cat([x, x.flip(-1)])).float().cpu().numpy()   # images, then flips
        for k, row in enumerate(good):
            i, label = batch[row], int(labels[row])
            for index, moment in ((2 * i, moments[k]), (2 * i + 1, moments[len(good) + k])):
                if f'{index}{SUFFIX[fmt]}' not in existing:
                    write_item(out, index, moment, label, fmt)
                    written += 1
    items = sum(1 for name in os.listdir(out) if name.endswith(SUFFIX[fmt]))
    skipped = [f'{file}: {reason}' for file, reason in folder.skipped] + damaged
    write_class_record(out, dict(record, items=items, skipped=skipped))
    channels, side, _ = vae.latent_shape((3, resolution, resolution))
    log.info('wrote %d files to %s; it holds %d items (%s format, moments %s); %d image files skipped%s',
             written, os.path.abspath(out), items, fmt, (2 * channels, side, side), len(skipped),
             ' (named above and in classes.json)' if skipped else '')
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', help='image folder: <images>/<class>/**/<image>, or images only (unconditional); '
                                       'for ImageNet, its train folder')
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
    return extract(args.images, args.out, args.resolution, args.format, args.vae, args.batch_size, args.num_workers,
                   args.device)


if __name__ == '__main__':
    main()
