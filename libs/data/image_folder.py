"""Any folder of images as a data set: `config.dataset = d(name='image_folder', path=..., resolution=R)`.

Layout (files and folders whose names start with '.' are ignored):

    <path>/<class name>/**/<image>   class-conditional: the classes are the sorted subfolder names, K their count,
                                     labels 0..K-1 (the null class of guidance is K)
    <path>/<image>                   unconditional: images and no subfolders; K = 0, every label is 0 (the null class)

Images are the files ending in .jpg, .jpeg, .png, .webp or .bmp (any case; decoded by content, so a PNG named .jpg
or a CMYK JPEG is read); other files are ignored and counted. Each image is converted to RGB and goes through
ADM's centre crop at `resolution` (`center_crop_arr`); EXIF orientation is not applied, as in ADM's
and the official loaders. Items are (x (3, R, R) float32 in [-1, 1], label), flipped in the train step when
`random_flip`.

Bad data (docs/own-images.md):
- refused at start-up, with a message naming the folder: no images, images beside class subfolders, a class folder
  without readable images, subfolders named like data set splits (train/, val/) instead of classes;
- skipped at start-up, each named and the total counted in the log: files whose header PIL cannot read (not an
  image, a text file named .jpg, a file cut inside its header);
- replaced when read: a file whose image data cannot be decoded (a truncated JPEG) is replaced by the next
  readable image of its class, with a warning that names it and counts the damaged files this process has met
  (on every process: each reads different files); one-pass readers (feature extraction, reference statistics) skip
  it instead (`CheckedImages`);
- counted at start-up: images whose short side is below `resolution` (upsampled by the crop).

`classes.json` (CLASSES_FILE) records the class names, {"num_classes": K, "classes": [...], ...}: written beside
a run's config.json and in its ckpts/ folder, and beside extracted features (scripts/extract_features.py).
"""
import json
import logging
import multiprocessing
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from libs.files import write_json

__all__ = ['ImageFolder', 'CheckedImages', 'DamagedImage', 'scan_folder', 'center_crop_arr', 'decode', 'to_signed',
           'CLASSES_FILE', 'IMAGE_EXTENSIONS', 'read_class_record', 'read_class_names', 'write_class_record']

log = logging.getLogger(__name__)
# Damaged files are met in the training processes and their loader workers, each reading different files: their
# warnings are shown on every process, whatever level the run gives the root logger there.
damage_log = logging.getLogger(__name__ + '.damaged')
damage_log.setLevel(logging.WARNING)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
SPLIT_NAMES = frozenset({'train', 'val', 'valid', 'validation', 'test'})
CLASSES_FILE = 'classes.json'
EXAMPLES = 5                    # files named in a warning that counts many


class DamagedImage(OSError):
    """An image file whose data cannot be decoded; the message names the file and PIL's reason."""


def _visible(names):
    return sorted(n for n in names if not n.startswith('.'))


def _image_files(folder):
    """(sorted image paths under `folder`, recursively, number of other files)."""
    images, others = [], 0
    for d, dirs, names in os.walk(folder):
        dirs[:] = _visible(dirs)
        for name in _visible(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(os.path.join(d, name))
            else:
                others += 1
    return sorted(images), others


def folder_class_names(path):
    """The class names of the image folder at `path`: its subfolders (not hidden), sorted; [] for images only."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path} (expected <path>/<class>/<image> or "
                                "<path>/<image>)")
    return [n for n in _visible(os.listdir(path)) if os.path.isdir(os.path.join(path, n))]


def _layout(path):
    """(files, labels, class names, number of non-image files): the folder's images and classes, by the layout
    rules of the module docstring; ValueError naming the folder where they are broken."""
    dirs = folder_class_names(path)
    entries = _visible(os.listdir(path))
    top, others = _image_files_here(path, entries)
    extensions = '/'.join(e[1:] for e in IMAGE_EXTENSIONS)
    if not dirs:
        if not top:
            raise ValueError(f"no images ({extensions}) in {path}")
        return top, [0] * len(top), [], others
    if top:
        raise ValueError(f"{path} holds images ({len(top)}, e.g. {top[0]}) beside subfolders ({', '.join(dirs[:3])}"
                         f"{', ...' if len(dirs) > 3 else ''}): put every image in a class subfolder "
                         "(class-conditional) or remove the subfolders (unconditional)")
    if set(dirs) <= SPLIT_NAMES:
        raise ValueError(f"the subfolders of {path} ({', '.join(dirs)}) look like data set splits, not classes: "
                         f"give the folder of one split, e.g. {os.path.join(path, dirs[0])}")
    files, labels = [], {}
    for k, name in enumerate(dirs):
        found, n_other = _image_files(os.path.join(path, name))
        if not found:
            raise ValueError(f"class folder {os.path.join(path, name)} holds no images ({extensions}): add images or "
                             f"remove it (every subfolder of {path} is a class)")
        files += found
        labels.update(dict.fromkeys(found, k))
        others += n_other
    files.sort()                # the order of ImageNet's loader: sorted full paths
    return files, [labels[f] for f in files], dirs, others


def _image_files_here(path, entries):
    """(sorted image files directly in `path`, number of other files there)."""
    files = [n for n in entries if os.path.isfile(os.path.join(path, n))]
    images = [os.path.join(path, n) for n in files if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(images), len(files) - len(images)


def _header(file):
    """((width, height), None) from the file's header, or (None, reason) if PIL cannot read it."""
    try:
        with Image.open(file) as img:
            return img.size, None
    except Exception as e:              # PIL raises many types for foreign or cut files; each names the problem
        return None, f'{type(e).__name__}: {e}'


def scan_folder(path, resolution):
    """Every image file of the folder `path` with its header read: a dict with `files` and `labels` (the readable
    ones), `class_names`, `skipped` [(file, reason)], `small` [(file, (w, h))] (short side below `resolution`) and
    `others` (files without an image extension)."""
    files, labels, class_names, others = _layout(path)
    kept, kept_labels, skipped, small = [], [], [], []
    for file, label in zip(files, labels):
        size, reason = _header(file)
        if size is None:
            skipped.append((file, reason))
            continue
        kept.append(file)
        kept_labels.append(label)
        if min(size) < resolution:
            small.append((file, size))
    missing = sorted(set(range(len(class_names))) - set(kept_labels))
    if missing or not kept:
        where = os.path.join(path, class_names[missing[0]]) if missing else path
        bad = [(f, reason) for f, reason in skipped if f.startswith(where + os.sep)]
        raise ValueError(f"{where} holds no readable images: all {len(bad)} image files skipped, e.g. "
                         f"{bad[0][0]} ({bad[0][1]})")
    return dict(files=kept, labels=kept_labels, class_names=class_names, skipped=skipped, small=small, others=others)


def center_crop_arr(img, resolution):
    """ADM's centre crop: halve with BOX while the short side >= 2*res, BICUBIC to short side = res, crop."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def decode(file, resolution):
    """(R, R, 3) uint8: the file converted to RGB and centre-cropped (ADM); DamagedImage if it cannot be decoded."""
    try:
        with Image.open(file) as img:
            rgb = img.convert('RGB')        # decodes the whole image: a truncated file fails here
    except Exception as e:                  # PIL raises many types for damaged data; each names the problem
        raise DamagedImage(f"{file}: {type(e).__name__}: {e}") from None
    return center_crop_arr(rgb, resolution)


def to_signed(arr):
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1] (as libs.data.datasets.ImageNet)."""
    return torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


class ImageFolder(Dataset):
    """The images of folder `path` (layout and bad-data rules in the module docstring), ADM centre crop at
    `resolution`. `num_classes` K (0: unconditional), `class_names`, `skipped` [(file, reason)] (the files the scan
    skipped), `notes` (what the scan found, as (logging level, message) pairs for the run's log)."""
    kind = 'pixels'

    def __init__(self, path, resolution, random_flip=True):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"config.dataset.resolution={resolution!r}: must be an integer >= 1")
        scan = scan_folder(path, resolution)
        self.path, self.resolution, self.random_flip = path, resolution, random_flip
        self.files, self.labels = scan['files'], torch.tensor(scan['labels'], dtype=torch.long)
        self.class_names, self.skipped = scan['class_names'], scan['skipped']
        self.num_classes = len(self.class_names)
        self.item_shape = (3, resolution, resolution)
        self.notes = _scan_notes(path, resolution, scan, random_flip)
        # One flag per item in shared memory: a damaged file found by one loader worker is known to the others.
        self._damaged = multiprocessing.RawArray('b', len(self.files))

    def __len__(self):
        return len(self.files)

    def record(self):
        """The classes.json record of this data set."""
        return dict(num_classes=self.num_classes, classes=self.class_names, source=os.path.abspath(self.path))

    def read(self, i):
        """(R, R, 3) uint8 pixels of item i; DamagedImage if its file cannot be decoded."""
        return decode(self.files[i], self.resolution)

    def _next_in_class(self, i):
        members = torch.nonzero(self.labels == self.labels[i]).flatten().tolist()
        k = members.index(i)
        return members[k + 1:] + members[:k]

    def _replacement(self, i, error):
        """Pixels of the next readable image of item i's class, after item i failed with `error`."""
        self._note_damaged(i, error)
        for j in self._next_in_class(i):
            if not self._damaged[j]:
                try:
                    return self.read(j)
                except DamagedImage as e:
                    self._note_damaged(j, e)
        raise RuntimeError(f"no image of class {int(self.labels[i])} under {self.path} can be decoded "
                           f"(the last: {error})")

    def _note_damaged(self, i, error):
        if not self._damaged[i]:
            self._damaged[i] = 1
            n = int(np.frombuffer(self._damaged, dtype=np.int8).sum())
            damage_log.warning('damaged image %s: replaced by the next readable image of its class wherever it is '
                               'drawn; %d damaged image file(s) met so far by this process', error, n)

    def __getitem__(self, i):
        if self._damaged[i]:
            arr = self._replacement(i, None)
        else:
            try:
                arr = self.read(i)
            except DamagedImage as e:
                arr = self._replacement(i, e)
        return to_signed(arr), self.labels[i]


def _examples(pairs):
    text = ', '.join(f'{f} ({"x".join(map(str, v)) if isinstance(v, tuple) else v})' for f, v in pairs[:EXAMPLES])
    return text + (', ...' if len(pairs) > EXAMPLES else '')


def _scan_notes(path, resolution, scan, random_flip):
    n, K = len(scan['files']), len(scan['class_names'])
    shown = ', '.join(f'{k} {name}' for k, name in enumerate(scan['class_names'][:20]))
    classes = (f"{K} classes ({shown}{', ...' if K > 20 else ''})" if K else
               "no classes (images without class subfolders: unconditional)")
    notes = [(logging.INFO, f"image folder {path}: {n} images, {classes}; ADM centre crop at {resolution} px, "
                            f"flips {'on' if random_flip else 'off'}")]
    if scan['others']:
        notes.append((logging.INFO, f"{scan['others']} files without an image extension "
                                    f"({', '.join(IMAGE_EXTENSIONS)}) ignored under {path}"))
    notes += [(logging.WARNING, f"skipped {file}: not a readable image ({reason})") for file, reason in scan['skipped']]
    if scan['skipped']:
        notes.append((logging.WARNING, f"{len(scan['skipped'])} of {n + len(scan['skipped'])} image files under "
                                       f"{path} skipped: not readable images (each named above)"))
    if scan['small']:
        notes.append((logging.WARNING, f"{len(scan['small'])} of {n} images have a short side below {resolution} px "
                                       f"and are upsampled: {_examples(scan['small'])}"))
    return notes


class CheckedImages(Dataset):
    """Items (pixels (3, R, R) uint8, label, error) of an ImageFolder for one-pass readers: `error` is '' or the
    reason its file cannot be decoded (then the pixels are zeros), so the reader skips the file and names it."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        try:
            arr, error = self.folder.read(i), ''
        except DamagedImage as e:
            arr, error = np.zeros(self.folder.item_shape[1:] + (3,), np.uint8), str(e)
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1), self.folder.labels[i], error


def _classes_path(path):
    return os.path.join(path, CLASSES_FILE) if os.path.isdir(path) else path


def read_class_record(path):
    """The classes.json record at `path` (the file, or a folder holding it): {'num_classes', 'classes', ...}."""
    file = _classes_path(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"class names not found: {file} (written by training on an image folder and by "
                                "scripts/extract_features.py)")
    with open(file) as f:
        record = json.load(f)
    names = record.get('classes') if isinstance(record, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
            and record.get('num_classes') == len(names)):
        raise ValueError(f"{file} is not a class-name file: expected {{\"num_classes\": K, \"classes\": [K names]}}")
    return record


def read_class_names(path):
    """The class names [name of class 0, ...] in classes.json at `path` (the file or its folder); [] for an
    unconditional data set."""
    return list(read_class_record(path)['classes'])


def write_class_record(path, record):
    """Write `record` ({'num_classes', 'classes', ...}) as classes.json at `path` (a file, or a folder to hold it),
    atomically; returns the file's path."""
    file = _classes_path(path)
    write_json(file, record)
    return file
