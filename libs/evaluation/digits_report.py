"""Quality of generated digits, measured with a classifier trained on the real 8x8 digits.

`sample_accuracy`: the fraction of samples that the classifier assigns to the class they were asked for.
`frechet_distance_digits`: the Fréchet distance between real and generated digits in the classifier's
hidden-layer feature space (FID's formula on a digits classifier; not FID).
The classifier (scikit-learn MLP) is trained once and cached in ~/.cache/dim (or $XDG_CACHE_HOME/dim).
"""
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from .fid import frechet_distance

__all__ = ['digits_classifier', 'to_digit_features', 'write_digits_report']

_CACHE_NAME = 'digits_mlp_v1.joblib'


def _cache_path():
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'dim', _CACHE_NAME)


def digits_classifier():
    """(MLPClassifier on 64 pixel values in [0, 16], its held-out accuracy); trained once, then cached."""
    import joblib
    path = _cache_path()
    if os.path.exists(path):
        try:
            return joblib.load(path)
        except Exception as e:      # a stale or truncated cache is retrained
            logging.warning('retraining the digits classifier (%s unreadable: %s)', path, e)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.25,
                                                        random_state=0, stratify=digits.target)
    clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=600, random_state=0).fit(x_train / 16, y_train)
    result = (clf, float(clf.score(x_test / 16, y_test)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    joblib.dump(result, path + '.tmp')
    os.replace(path + '.tmp', path)
    return result


def to_digit_features(images):
    """(N, 1, H, W) images in [0, 1] -> (N, 64) pixel values in [0, 16] of 8x8 digits (area downsampling)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[-1] % 8 or x.shape[-2] % 8:
        raise ValueError(f"expected (N, 1, H, W) digit images with H, W multiples of 8, got {tuple(x.shape)}")
    x = F.adaptive_avg_pool2d(x, 8)
    return (x.flatten(1) * 16).numpy().astype(np.float64)


def _hidden(clf, x):
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def write_digits_report(images, labels, out_dir, extra=None):
    """Score generated digits and write `<out_dir>/report.json`; returns its path.

    images (N, 1, H, W) in [0, 1]; labels (N,) the classes they were generated for; extra: more fields to record.
    """
    from sklearn.datasets import load_digits
    clf, heldout = digits_classifier()
    feats = to_digit_features(images) / 16
    labels = np.asarray(torch.as_tensor(labels).cpu())
    pred = clf.predict(feats)
    per_class = {str(k): float(np.mean(pred[labels == k] == k)) for k in np.unique(labels)}
    real = _hidden(clf, load_digits().data / 16)
    fake = _hidden(clf, feats)
    fd = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    report = {
        'sample_accuracy': float(np.mean(pred == labels)),
        'sample_accuracy_per_class': per_class,
        'frechet_distance_digits': float(fd),
        'n_samples': int(len(labels)),
        'classifier': 'sklearn MLPClassifier(128) on 8x8 digits',
        'classifier_heldout_accuracy': heldout,
        **(extra or {}),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'report.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(report, f, indent=2)
    os.replace(path + '.tmp', path)
    return path
