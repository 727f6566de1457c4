"""Training data sets: `get_dataset(**config.dataset)`.

Items are deterministic `(x, label)` pairs: random flips and CFG label dropout are applied in the
train step from a seeded generator (`augment_batch`, in the training process, after the DataLoader workers), so a
resumed run sees exactly the same data whatever the number of workers.
Every data set exposes `num_classes` (K; the null class is K), `kind` ('pixels' or 'moments'),
`item_shape` and `random_flip`. Those that know their class names (`image_folder`, libs/data/image_folder.py; feature
folders with a classes.json) also give `record()` (their classes.json record) and `notes` (start-up log lines).
"""
import inspect
import logging
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from libs.data.image_folder import CLASSES_FILE, ImageFolder, center_crop_arr, read_class_record, to_signed
from libs.files import UnreadableFile, load_npz

__all__ = ['get_dataset', 'check_dataset_config', 'augment_batch', 'center_crop_arr', 'DATASETS', 'RUN_KEYS']


class Digits(Dataset):
    """scikit-learn's 1,797 labelled 8x8 digits, upsampled to `resolution`, in [-1, 1]. Needs no download."""
    kind, num_classes = 'pixels', 10

    def __init__(self, resolution=16, random_flip=False):
        from sklearn.datasets import load_digits
        if resolution < 8:
            raise ValueError(f"digits resolution must be >= 8, got {resolution}")
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1   # (1797, 1, 8, 8)
        if resolution != 8:
            x = F.interpolate(x, size=(resolution, resolution), mode='bilinear', align_corners=False)
        self.x, self.y = x, torch.tensor(digits.target, dtype=torch.long)
        self.item_shape, self.random_flip = tuple(x.shape[1:]), random_flip

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Cifar10(Dataset):
    """torchvision CIFAR-10 train split from a local folder (no download), 3x32x32 in [-1, 1]."""
    kind, num_classes, item_shape = 'pixels', 10, (3, 32, 32)

    def __init__(self, path, random_flip=True):
        import torchvision
        try:
            self.data = torchvision.datasets.CIFAR10(path, train=True, download=False)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"CIFAR-10 not found under {path} (expected {path}/cifar-10-batches-py). Download the python "
                "version from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there.") from e
        self.random_flip = random_flip

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img, label = self.data[i]
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        return x, torch.tensor(label)


class ImageNet(Dataset):
    """Raw ImageNet train images (<path>/train/<wnid>/<wnid>_*.JPEG), ADM centre crop, in [-1, 1].

    The label is the index of the file-name prefix (the wnid) among the sorted wnids, as in the official code.
    Encoded by the autoencoder in the train step.
    """
    kind = 'pixels'
    EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif')

    def __init__(self, path, resolution=256, random_flip=True):
        root = os.path.join(path, 'train')
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageNet train folder not found: {root} (expected <path>/train/<wnid>/*.JPEG)")
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                       if f.lower().endswith(self.EXTENSIONS))
        if not files:
            raise FileNotFoundError(f"no images under {root}")
        wnids = [os.path.basename(f).split('_')[0] for f in files]
        classes = {w: k for k, w in enumerate(sorted(set(wnids)))}
        self.files, self.labels = files, torch.tensor([classes[w] for w in wnids])
        self.num_classes = len(classes)
        self.resolution, self.random_flip = resolution, random_flip
        self.item_shape = (3, resolution, resolution)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            arr = center_crop_arr(img.convert('RGB'), self.resolution)
        return to_signed(arr), self.labels[i]


class LatentFeatures(Dataset):
    """Precomputed autoencoder moments (mean | logvar, 2C x h x w) and labels, one file per item.

    Reads the official format `{idx}.npy.npz` (arrays `z`, `label`) and U-ViT's `{idx}.npy` (a pickled
    (moments, label) tuple). Flipped copies are stored as extra items by the extraction script. Item k is the k-th
    smallest index present (indices of images the extraction skipped are missing). The class count K and the class
    names come from the folder's classes.json (written by scripts/extract_features.py); without it, K = 1000 and
    the names are unknown (ImageNet's official features). A file that cannot be read, lacks an array, or holds
    moments of another shape than item 0's raises libs.files.UnreadableFile naming it.
    """
    kind, random_flip = 'moments', False
    IMAGENET_CLASSES = 1000

    def __init__(self, path):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"feature folder not found: {path} (make it with scripts/extract_features.py)")
        names = os.listdir(path)
        self.suffix = '.npy.npz' if any(f.endswith('.npy.npz') for f in names) else '.npy'
        indices = sorted(int(f[:-len(self.suffix)]) for f in names
                         if f.endswith(self.suffix) and f[:-len(self.suffix)].isdigit())
        if not indices:
            raise FileNotFoundError(f"no feature files ({{idx}}.npy.npz or {{idx}}.npy) in {path}")
        self.path, self.n = path, len(indices)
        # Contiguous indices (every complete extraction without skipped images) need no table.
        self.indices = None if indices[-1] == self.n - 1 else np.array(indices, dtype=np.int64)
        self.num_classes, self.class_names, self.notes = self.IMAGENET_CLASSES, None, []
        if os.path.isfile(os.path.join(path, CLASSES_FILE)):
            record = read_class_record(path)
            self.num_classes, self.class_names = record['num_classes'], record['classes']
            self.notes = _feature_notes(path, record, self.n)
        self.item_shape = None                      # item 0 sets the shape every other item is checked against
        self.item_shape = tuple(self[0][0].shape)

    def __len__(self):
        return self.n

    def record(self):
        """The classes.json record of this data set (None without a classes.json)."""
        if self.class_names is None:
            return None
        return dict(num_classes=self.num_classes, classes=self.class_names, source=os.path.abspath(self.path))

    def _read(self, file):
        if self.suffix == '.npy.npz':
            with load_npz(file) as f:
                missing = [k for k in ('z', 'label') if k not in f]
                if missing:
                    raise UnreadableFile(file, f"lacks the array(s) {missing} (it has {sorted(f.files)}): not a "
                                               "feature file of scripts/extract_features.py")
                return f['z'], f['label']
        try:
            item = np.load(file, allow_pickle=True)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise UnreadableFile(file, f"is truncated or not a U-ViT feature file ({type(e).__name__}: {e})") from None
        if not (isinstance(item, (tuple, list)) or getattr(item, 'shape', None) == (2,)) or len(item) != 2:
            raise UnreadableFile(file, "does not hold a (moments, label) pair: not a U-ViT feature file")
        return item

    def __getitem__(self, i):
        index = i if self.indices is None else int(self.indices[i])
        file = os.path.join(self.path, f'{index}{self.suffix}')
        z, label = self._read(file)
        z = np.asarray(z, dtype=np.float32)
        if self.item_shape is not None and z.shape != self.item_shape:
            raise UnreadableFile(file, f"holds moments of shape {z.shape}, item 0 of {self.path} {self.item_shape}")
        return torch.from_numpy(z), torch.tensor(int(label))


def _feature_notes(path, record, n):
    """Log lines about a feature folder whose classes.json the extraction wrote."""
    K = record['num_classes']
    notes = [(logging.INFO, f"features {path}: {n} items, " + (f"{K} classes from {CLASSES_FILE}" if K else
                                                               f"no classes ({CLASSES_FILE}: unconditional)"))]
    expected = record.get('items')
    if expected is None:
        notes.append((logging.WARNING, f"{path}/{CLASSES_FILE} has no item count: the extraction has not finished "
                                       f"(rerun scripts/extract_features.py to complete it); training on {n} items"))
    elif expected != n:
        notes.append((logging.WARNING, f"{path} holds {n} feature files but its extraction wrote {expected}"))
    return notes


DATASETS = {
    'digits': lambda path=None, resolution=16, random_flip=False: Digits(resolution, random_flip),
    'cifar10': lambda path, random_flip=True: Cifar10(path, random_flip),
    'imagenet': lambda path, resolution=256, random_flip=True: ImageNet(path, resolution, random_flip),
    'imagenet256_features': lambda path: LatentFeatures(path),
    'imagenet512_features': lambda path: LatentFeatures(path),
    'image_folder': lambda path, resolution, random_flip=True: ImageFolder(path, resolution, random_flip),
    'features': lambda path: LatentFeatures(path),
}
# Keys of config.dataset read by the training and evaluation, not by the data set itself: the CFG label-dropout
# probability and the FID reference statistics.
RUN_KEYS = ('p_uncond', 'fid_stat')


def _dataset_args(name, kwargs):
    """The data set's own keyword arguments of config.dataset, checked against its signature."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} (config.dataset.name); expected one of {sorted(DATASETS)}")
    args = {k: v for k, v in kwargs.items() if k not in RUN_KEYS}
    known = [p for p in inspect.signature(DATASETS[name]).parameters]
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join('config.dataset.' + k for k in unknown)} for data set {name!r} "
                         f"(its keys: {', '.join(known + list(RUN_KEYS))})")
    try:
        inspect.signature(DATASETS[name]).bind(**args)
    except TypeError as e:
        raise ValueError(f"config.dataset for {name!r}: {e}") from None
    return args


def check_dataset_config(name, **kwargs):
    """Raise ValueError naming any config.dataset key that data set `name` does not read (nothing is loaded)."""
    _dataset_args(name, kwargs)


def get_dataset(name, **kwargs):
    """`get_dataset(**config.dataset)`."""
    args = _dataset_args(name, kwargs)
    return DATASETS[name](**args)


def _to_device_of(mask, like):
    """A small CPU tensor on `like`'s device: copied asynchronously (from pinned memory on CUDA), never blocking."""
    if mask.device == like.device:
        return mask
    if like.device.type == 'cuda':
        mask = mask.pin_memory()
    return mask.to(like.device, non_blocking=True)


def augment_batch(x, y, dataset, p_uncond, conditional, generator):
    """Random horizontal flips (if the data set uses them) and CFG label dropout to the null class K.

    x (B, C, H, W), y (B,), on any device; the random choices come from `generator` (a CPU generator: the same
    numbers whatever the device) and are applied where x and y are.
    Unconditional training (conditional=False) always feeds the null class.
    """
    B = x.shape[0]
    if dataset.random_flip:
        flip = torch.rand(B, generator=generator) < 0.5
        x = torch.where(_to_device_of(flip.view(B, 1, 1, 1), x), x.flip(-1), x)
    K = dataset.num_classes
    if not conditional:
        return x, torch.full_like(y, K)
    drop = torch.rand(B, generator=generator) < p_uncond
    return x, torch.where(_to_device_of(drop, y), torch.full_like(y, K), y)
