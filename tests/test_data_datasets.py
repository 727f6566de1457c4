"""Data sets: the embedded digits, latent-feature files in both formats, raw ImageNet folders, augmentation."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from libs.data.datasets import augment_batch, center_crop_arr, check_dataset_config, get_dataset
from libs.data.image_folder import write_class_record
from libs.files import UnreadableFile


def test_digits_are_resized_labelled_and_in_range():
    d = get_dataset('digits', resolution=16, p_uncond=0.1)
    x, y = d[7]
    assert len(d) == 1797 and d.item_shape == (1, 16, 16) and d.num_classes == 10
    assert x.shape == (1, 16, 16) and -1 <= x.min() and x.max() <= 1 and 0 <= int(y) < 10
    assert d.random_flip is False and d.kind == 'pixels'
    d32 = get_dataset('digits', resolution=32)
    assert d32[7][0].shape == (1, 32, 32)
    assert torch.allclose(torch.nn.functional.avg_pool2d(d32[7][0], 4), torch.nn.functional.avg_pool2d(x, 2), atol=0.05)


@pytest.mark.parametrize('fmt', ['official', 'uvit'])
def test_feature_files_in_both_formats(tmp_path, fmt):
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((3, 8, 4, 4)).astype(np.float32)
    for i in range(3):
        if fmt == 'official':
            np.savez(tmp_path / f'{i}.npy', z=moments[i], label=np.int64(i + 5))   # numpy appends .npz
        else:
            np.save(tmp_path / f'{i}.npy', np.array((moments[i], i + 5), dtype=object), allow_pickle=True)
    d = get_dataset('imagenet256_features', path=str(tmp_path), p_uncond=0.15)
    assert len(d) == 3 and d.item_shape == (8, 4, 4) and d.kind == 'moments'
    for i in range(3):
        z, label = d[i]
        assert np.array_equal(z.numpy(), moments[i]) and int(label) == i + 5


def test_feature_folders_take_their_classes_from_classes_json_and_may_have_gaps(tmp_path):
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((6, 8, 4, 4)).astype(np.float32)
    for i in (0, 1, 4, 5):                                  # items 2 and 3: an image the extraction skipped
        np.savez(tmp_path / f'{i}.npy', z=moments[i], label=np.int64(i % 3))
    d = get_dataset('features', path=str(tmp_path))
    assert d.num_classes == 1000 and d.class_names is None and d.record() is None and d.notes == []
    assert len(d) == 4 and [int(d[k][1]) for k in range(4)] == [0, 1, 1, 2]
    assert np.array_equal(d[2][0].numpy(), moments[4])
    write_class_record(tmp_path, dict(num_classes=3, classes=['a', 'b', 'c'], source='x', resolution=32))
    d = get_dataset('features', path=str(tmp_path))
    assert d.num_classes == 3 and d.class_names == ['a', 'b', 'c'] and d.record()['classes'] == ['a', 'b', 'c']
    assert d.notes[0] == (logging.INFO, f'features {tmp_path}: 4 items, 3 classes from classes.json')
    assert 'the extraction has not finished' in d.notes[1][1]
    write_class_record(tmp_path, dict(num_classes=3, classes=['a', 'b', 'c'], items=4, skipped=['x.jpg: cut']))
    assert len(get_dataset('features', path=str(tmp_path)).notes) == 1


@pytest.mark.parametrize('fmt', ['official', 'uvit'])
def test_unreadable_feature_files_are_named(tmp_path, fmt):
    rng = np.random.default_rng(0)
    for i in range(4):
        z = rng.standard_normal((8, 4, 4) if i != 3 else (8, 2, 2)).astype(np.float32)
        if fmt == 'official':
            np.savez(tmp_path / f'{i}.npy', **({'z': z, 'label': np.int64(i)} if i != 2 else {'moments': z}))
        else:
            np.save(tmp_path / f'{i}.npy', np.array((z, i), dtype=object) if i != 2 else z, allow_pickle=True)
    suffix = '.npy.npz' if fmt == 'official' else '.npy'
    d = get_dataset('imagenet256_features', path=str(tmp_path))
    whole = (tmp_path / f'1{suffix}').read_bytes()
    (tmp_path / f'1{suffix}').write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UnreadableFile, match=rf'^{tmp_path}/1{suffix}: is truncated'):
        d[1]
    lacks = r"lacks the array\(s\) \['z', 'label'\] \(it has \['moments'\]\)" if fmt == 'official' else \
        r'does not hold a \(moments, label\) pair'
    with pytest.raises(UnreadableFile, match=rf'^{tmp_path}/2{suffix}: {lacks}'):
        d[2]
    with pytest.raises(UnreadableFile, match=rf'^{tmp_path}/3{suffix}: holds moments of shape \(8, 2, 2\), item 0 of '
                                             rf'{tmp_path} \(8, 4, 4\)'):
        d[3]


def test_raw_imagenet_folder(tmp_path):
    rng = np.random.default_rng(0)
    for wnid, sizes in [('n02', [(70, 50)]), ('n01', [(40, 90), (64, 64)])]:
        (tmp_path / 'train' / wnid).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / 'train' / wnid / f'{wnid}_{k}.JPEG')
    d = get_dataset('imagenet', path=str(tmp_path), resolution=32)
    assert len(d) == 3 and d.num_classes == 2
    assert sorted(int(d[i][1]) for i in range(3)) == [0, 0, 1]             # n01 -> 0, n02 -> 1
    assert d[0][0].shape == (3, 32, 32) and d[0][0].abs().max() <= 1


def test_adm_center_crop():
    img = Image.fromarray(np.zeros((300, 700, 3), dtype=np.uint8))
    assert center_crop_arr(img, 64).shape == (64, 64, 3)


def test_missing_and_unknown_data():
    with pytest.raises(FileNotFoundError, match='CIFAR-10 not found under /nonexistent'):
        get_dataset('cifar10', path='/nonexistent', random_flip=True)
    with pytest.raises(FileNotFoundError, match='/nonexistent/train'):
        get_dataset('imagenet', path='/nonexistent')
    with pytest.raises(FileNotFoundError, match='feature folder not found'):
        get_dataset('imagenet512_features', path='/nonexistent')
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        get_dataset('svhn')
    with pytest.raises(ValueError, match=r"unknown key\(s\) config.dataset.random_crop for data set 'digits'"):
        get_dataset('digits', path='x', resolution=16, random_crop=True)
    with pytest.raises(ValueError, match=r"unknown key\(s\) config.dataset.cfg for data set 'digits'"):
        check_dataset_config('digits', resolution=16, cfg=True, p_uncond=0.1)


class _Flippy:
    num_classes, random_flip = 10, True


def test_augmentation_flips_and_drops_labels():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3).repeat(500, 1, 1, 1)
    y = torch.randint(0, 10, (1000,))
    g = torch.Generator().manual_seed(0)
    xa, ya = augment_batch(x, y, _Flippy(), 0.15, True, g)
    flipped = (xa == x.flip(-1)).all(dim=(1, 2, 3))
    assert 0.4 < flipped.float().mean() < 0.6 and ((xa == x).all(dim=(1, 2, 3)) | flipped).all()
    dropped = ya == 10
    assert 0.11 < dropped.float().mean() < 0.19 and (ya[~dropped] == y[~dropped]).all()
    _, yu = augment_batch(x, y, _Flippy(), 0.15, False, g)
    assert (yu == 10).all()                                                  # unconditional: always null class
