"""scripts/extract_features.py and scripts/inspect_checkpoint.py on tiny inputs written by the test."""
import logging
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from libs import get_nnet
from libs.data.autoencoder import load_autoencoder
from image_folders import write_shapes, write_text_as_jpeg, write_truncated_jpeg
from libs.data.datasets import ImageNet, LatentFeatures, get_dataset
from libs.data.image_folder import ImageFolder, read_class_record
from test_data_autoencoder import SMALL, random_ldm_state_dict
from test_evaluation_fid import random_inception_state_dict
from tiny_assets import write_config

EXTRACT = str(ROOT / 'scripts' / 'extract_features.py')
STATS = str(ROOT / 'scripts' / 'fid_reference_stats.py')
INSPECT = str(ROOT / 'scripts' / 'inspect_checkpoint.py')
TINY = dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=3, in_channels=4, sample_size=4,
            num_embeds_ada_norm=10)


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    """<root>/train/<wnid>/<wnid>_k.JPEG: 2 classes x 3 images of assorted sizes, and a 16px tiny VAE."""
    root = tmp_path_factory.mktemp('imagenet')
    rng = np.random.default_rng(0)
    for c in range(2):
        folder = root / 'train' / f'n0000000{c}'
        folder.mkdir(parents=True)
        for k in range(3):
            h, w = rng.integers(16, 60, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f'n0000000{c}_{k}.JPEG')
    vae = root / 'autoencoder_kl.pth'
    torch.save(random_ldm_state_dict(**SMALL), vae)
    return root, vae


@pytest.mark.parametrize('fmt', ['official', 'uvit'])
def test_extract_features_both_formats_and_resume(imagenet, tmp_path, fmt):
    root, vae_path = imagenet
    extract = runpy.run_path(EXTRACT)['extract']
    out = tmp_path / 'features'
    common = dict(resolution=16, fmt=fmt, vae_path=str(vae_path), batch_size=4, num_workers=0, device='cpu',
                  progress=False)
    assert extract(str(root / 'train'), str(out), **common) == 12
    suffix = {'official': '.npy.npz', 'uvit': '.npy'}[fmt]
    assert sorted(os.listdir(out)) == sorted([f'{i}{suffix}' for i in range(12)] + ['classes.json'])
    record = read_class_record(out)
    assert record['classes'] == ['n00000000', 'n00000001'] and record['num_classes'] == 2
    assert record['items'] == 12 and record['skipped'] == [] and record['resolution'] == 16

    # Item i is written as 2i, its horizontal flip as 2i + 1; moments (8, 8, 8) = [mean | logvar] of 16px images.
    images = ImageNet(str(root), resolution=16, random_flip=False)
    vae = load_autoencoder(str(vae_path), device='cpu')
    x = torch.stack([images[i][0] for i in range(6)])
    expected = vae.encode_moments(torch.cat([x, x.flip(-1)]))
    features = LatentFeatures(str(out))
    assert len(features) == 12 and features.num_classes == 2
    for i in range(6):
        for k, row in ((2 * i, i), (2 * i + 1, 6 + i)):
            z, label = features[k]
            assert z.shape == (8, 8, 8) and z.dtype == torch.float32
            torch.testing.assert_close(z, expected[row], rtol=1e-5, atol=1e-5)
            assert label.item() == images.labels[i].item() == i // 3
    if fmt == 'official':
        with np.load(out / '3.npy.npz') as f:
            assert sorted(f.files) == ['label', 'z'] and f['label'].dtype == np.int64 and f['label'].shape == ()

    mtimes = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}
    os.remove(out / f'5{suffix}')                          # the flip of item 2
    (out / '.9.123.tmp').write_bytes(b'half')              # an interrupted write
    assert extract(str(root / 'train'), str(out), **common) == 1
    assert sorted(os.listdir(out)) == sorted(mtimes)
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in mtimes.items() if n not in (f'5{suffix}', 'classes.json'))
    torch.testing.assert_close(LatentFeatures(str(out))[5][0], expected[8], rtol=1e-5, atol=1e-5)


def test_extract_features_command_line_and_missing_vae(imagenet, tmp_path):
    root, vae_path = imagenet
    out = tmp_path / 'features'
    run = subprocess.run([sys.executable, EXTRACT, str(root / 'train'), str(out), '--resolution', '16',
                          '--vae', str(vae_path), '--format', 'uvit', '--batch-size', '4', '--num-workers', '0',
                          '--device', 'cpu'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'wrote 12 files to {out}' in run.stderr and 'moments (8, 8, 8)' in run.stderr
    missing = tmp_path / 'autoencoder_kl.pth'
    with pytest.raises(FileNotFoundError, match=rf'(?s){missing}.*stable-diffusion/'):
        runpy.run_path(EXTRACT)['extract'](str(root / 'train'), str(out), vae_path=str(missing), device='cpu')
    with pytest.raises(ValueError, match=r'look like data set splits, not classes: .* e\.g\. .*/train'):
        runpy.run_path(EXTRACT)['extract'](str(root), str(out), vae_path=str(vae_path), device='cpu')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """3 classes x 4 shape images of assorted sizes and formats, plus a truncated JPEG (class 'red') and a text
    file named .jpg (class 'green')."""
    root = tmp_path_factory.mktemp('shapes') / 'images'
    written = write_shapes(root, classes=('green', 'red', 'yellow'), per_class=4)
    write_truncated_jpeg(root / 'red' / 'red_cut.jpg')
    write_text_as_jpeg(root / 'green' / 'notes.jpg')
    return root, written


def test_extract_features_of_an_image_folder_skips_bad_files(imagenet, shapes, tmp_path, caplog):
    _, vae_path = imagenet
    root, written = shapes
    extract = runpy.run_path(EXTRACT)['extract']
    out = tmp_path / 'features'
    common = dict(resolution=16, vae_path=str(vae_path), batch_size=5, num_workers=0, device='cpu', progress=False)
    caplog.set_level(logging.INFO)
    assert extract(str(root), str(out), **common) == 2 * 12
    files = sorted(written)
    record = read_class_record(out)
    assert record['classes'] == ['green', 'red', 'yellow'] and record['items'] == 24
    assert len(record['skipped']) == 2
    assert f"{root / 'green' / 'notes.jpg'}: UnidentifiedImageError" in record['skipped'][0]
    assert f"{root / 'red' / 'red_cut.jpg'}: OSError: image file is truncated" in record['skipped'][1]
    assert f"skipped {root / 'red' / 'red_cut.jpg'}" in caplog.text and '2 image files skipped' in caplog.text

    # The truncated file leaves its two indices free; the data set lists the others.
    cut = sorted(files + [str(root / 'red' / 'red_cut.jpg')]).index(str(root / 'red' / 'red_cut.jpg'))
    assert f'{2 * cut}.npy.npz' not in os.listdir(out) and f'{2 * cut + 2}.npy.npz' in os.listdir(out)
    features = get_dataset('features', path=str(out))
    assert len(features) == 24 and features.num_classes == 3 and features.class_names == record['classes']
    assert [int(features[k][1]) for k in range(0, 24, 2)] == [written[f] for f in files]
    assert extract(str(root), str(out), **common) == 0                      # resumed: nothing left but the bad file

    uncond = tmp_path / 'uncond'
    write_shapes(uncond, per_class=2, conditional=False)
    assert extract(str(uncond), str(tmp_path / 'uncond_features'), **common) == 16
    features = get_dataset('features', path=str(tmp_path / 'uncond_features'))
    assert features.num_classes == 0 and features.class_names == [] and int(features[3][1]) == 0
    with pytest.raises(ValueError, match='holds features of other classes'):
        extract(str(uncond), str(out), **common)


def test_fid_reference_of_an_image_folder(shapes, tmp_path, caplog):
    root, written = shapes
    script = runpy.run_path(STATS)
    caplog.set_level(logging.INFO)
    n, batches = script['image_folder_batches'](str(root), 16, batch_size=5, num_workers=0)
    positions, images = zip(*batches)
    folder = ImageFolder(str(root), 16, random_flip=False)
    cut = folder.files.index(str(root / 'red' / 'red_cut.jpg'))
    assert n == 13 and np.concatenate(positions).tolist() == [i for i in range(13) if i != cut]
    expected = [torch.from_numpy(np.array(folder.read(i))).permute(2, 0, 1) / 255 for i in range(13) if i != cut]
    assert torch.equal(torch.cat(images), torch.stack(expected))          # the crops training sees, in [0, 1]
    assert f"skipped {root / 'red' / 'red_cut.jpg'}" in caplog.text

    weights = tmp_path / 'inception.pth'
    torch.save(random_inception_state_dict(), weights)
    script['main']([str(root), str(tmp_path / 'stats.npz'), '--resolution', '16', '--weights', str(weights),
                    '--device', 'cpu', '--batch-size', '6', '--num-workers', '0', '--pr-subset', '4'])
    assert '12 images from' in caplog.text and '1 image files skipped' in caplog.text
    with np.load(tmp_path / 'stats.npz') as f:
        assert f['n_images'] == 12 and cut not in f['pr_indices'] and len(f['pr_features']) == len(f['pr_indices'])
    with pytest.raises(ValueError, match='give --resolution R'):
        script['main']([str(root), str(tmp_path / 'x.npz'), '--weights', str(weights), '--device', 'cpu'])


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp('inspect')
    config = root / 'tiny_dim.py'
    write_config(config, nnet=TINY)
    upsample = root / 'tiny_upsample.py'
    write_config(upsample, nnet=dict(TINY, sample_size=8, num_patches=[16, 4, 4], multi_times=2))
    deeper = root / 'tiny_deeper.py'
    write_config(deeper, nnet=dict(TINY, num_layers=5))
    ckpt = root / '100.ckpt'
    ckpt.mkdir()
    torch.manual_seed(0)
    model = get_nnet(**TINY)
    torch.save(model.state_dict(), ckpt / 'nnet.pth')
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    torch.save(ema, ckpt / 'nnet_ema.pth')
    return ckpt, model, [str(config), str(upsample), str(deeper)]


def test_inspect_checkpoint_identifies_the_config(checkpoint, capsys):
    ckpt, model, configs = checkpoint
    main = runpy.run_path(INSPECT)['main']
    info = main([str(ckpt / 'nnet_ema.pth'), *sum((['--config', c] for c in configs), [])])
    n_params = sum(p.numel() for p in model.parameters())
    assert info['n_params'] == n_params and info['n_tensors'] == len(model.state_dict())
    assert info['table_grid'] == 2
    assert info['configs']['tiny_dim']['match'] == 'exact' and info['configs']['tiny_dim']['n_params'] == n_params
    assert info['configs']['tiny_upsample']['match'] == 'interpolated'
    deeper = info['configs']['tiny_deeper']
    assert deeper['match'] is None and any(k.startswith('transformer_blocks.3.') for k in deeper['missing'])
    assert info['ema']['by_name'] and info['ema']['sibling_differs']
    assert info['ema']['max_abs_diff'] == pytest.approx(0.01, abs=1e-6)
    text = capsys.readouterr().out
    assert f'{n_params:,} parameters' in text and '2x2 token grid' in text and 'EMA by its file name' in text
    assert 'tiny_dim' in text and 'no match' in text


def test_inspect_checkpoint_command_line_default_configs(checkpoint):
    ckpt, _, _ = checkpoint
    run = subprocess.run([sys.executable, INSPECT, str(ckpt / 'nnet.pth')], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'not named as EMA' in run.stdout and 'differs from' in run.stdout
    for name in ('imagenet256_H_DiM', 'imagenet512_H_DiM_upsample_test', 'cifar10_S_DiM'):
        assert name in run.stdout
