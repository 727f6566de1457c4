"""The names of a config's classes, and class requests (ids or names) turned into class ids.

    names = class_names(config, nnet_path)   # ['0', ..., '9'] for digits, ImageNet's 1,000 names, None if unnamed
    ids = resolve_classes(['207', 'otter', 'Giant Panda'], names, num_classes(config))   # [207, 360, 388]

The names a network was trained with come first: the classes.json that a run on an image folder or on features
with names writes beside its checkpoints (in the checkpoint's folder, its ckpts/ folder or the workdir above).
Otherwise, by data set (config.dataset.name), in label order:
- digits: '0' ... '9';
- cifar10: the 10 names of CIFAR-10's `batches.meta`, airplane ... truck;
- imagenet, imagenet256_features, imagenet512_features: torchvision's embedded list of the 1,000 ImageNet class
  names (`ResNet50_Weights.IMAGENET1K_V1.meta['categories']`, no download), whose index order is the sorted-wnid
  order of our labels (libs/data/datasets.py, `ImageNet`);
- image_folder: the class subfolders of config.dataset.path, sorted (libs/data/image_folder.py);
- features: the classes.json of the feature folder (scripts/extract_features.py), else None;
- any unconditional config (config.train.mode='uncond'): None, it has no classes to ask for.
A data set that brings its own names adds its reader to `NAME_READERS`.
"""
import difflib
import os

from libs.config import ConfigError, is_conditional, num_classes
from libs.data.image_folder import CLASSES_FILE, folder_class_names, read_class_names

__all__ = ['class_names', 'resolve_classes', 'NAME_READERS']

CIFAR10_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def _imagenet_names(config):
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V1.meta['categories'])


def _feature_names(config):
    path = os.path.join(config.dataset.path, CLASSES_FILE)
    return read_class_names(path) if os.path.isfile(path) else None


def _names_beside(nnet_path):
    """The class names in the classes.json nearest above the weights at `nnet_path`, or None: the checkpoint's
    folder, its ckpts/ folder, the workdir."""
    folder = os.path.dirname(os.path.abspath(nnet_path))
    for _ in range(3):
        if os.path.isfile(os.path.join(folder, CLASSES_FILE)):
            return read_class_names(folder)
        folder = os.path.dirname(folder)
    return None


NAME_READERS = {
    'digits': lambda config: [str(k) for k in range(10)],
    'cifar10': lambda config: list(CIFAR10_NAMES),
    'imagenet': _imagenet_names,
    'imagenet256_features': _imagenet_names,
    'imagenet512_features': _imagenet_names,
    'image_folder': lambda config: folder_class_names(config.dataset.path),
    'features': _feature_names,
}


def class_names(config, nnet_path=None):
    """The list of config's class names, entry k naming label k; None for an unconditional config or a data set
    without names (its classes are then asked for by id). `nnet_path`: the weights, near which a classes.json of
    their run is looked for first. ConfigError if the names do not match the network's class count
    (config.nnet.num_embeds_ada_norm)."""
    if not is_conditional(config):
        return None
    names = _names_beside(nnet_path) if nnet_path else None
    if names is None:
        reader = NAME_READERS.get(config.get('dataset', {}).get('name'))
        names = reader(config) if reader is not None else None
    if not names:
        return None
    K = num_classes(config)
    if len(names) != K:
        raise ConfigError(f"config.dataset.name={config.dataset.name!r} has {len(names)} class names but the network "
                          f"has config.nnet.num_embeds_ada_norm={K} classes")
    return names


def resolve_classes(requested, names, num_classes):
    """Class ids [0, num_classes) of `requested`: ids (ints or digit strings) or names (exact, else
    case-insensitive; spaces at the ends ignored). A digit string is an id unless it is itself one of the names (the
    digits' names are their ids anyway). ValueError naming every request that matches nothing, with the closest
    names, or more than one name (ImageNet's 'Cardigan', the corgi, and 'cardigan', the jacket)."""
    exact = {name.strip(): k for k, name in enumerate(names or ())}
    by_name = {}
    for k, name in enumerate(names or ()):
        by_name.setdefault(name.strip().lower(), []).append(k)
    ids, problems = [], []
    for item in requested:
        key = str(item).strip().lower()
        if str(item).strip() in exact:
            ids.append(exact[str(item).strip()])
        elif len(by_name.get(key, ())) == 1:
            ids.append(by_name[key][0])
        elif key in by_name:
            matches = ', '.join(f"{names[k]!r} ({k})" for k in by_name[key])
            problems.append(f"{item!r} names more than one class: {matches}; give the exact name or the id")
        elif key.isdigit() or isinstance(item, int):
            k = int(item)
            if 0 <= k < num_classes:
                ids.append(k)
            else:
                problems.append(f"class id {k} is out of range [0, {num_classes})")
        elif not names:
            problems.append(f"{item!r} is not a class id in [0, {num_classes}) (this model's classes have no names)")
        else:
            close = difflib.get_close_matches(key, by_name, n=5, cutoff=0.5)
            hint = ', '.join(f"{names[k]!r} ({k})" for c in close for k in by_name[c]) or 'none'
            problems.append(f"no class named {item!r}; closest names: {hint}")
    if problems:
        raise ValueError('; '.join(problems))
    return ids
