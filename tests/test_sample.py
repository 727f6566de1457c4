"""sample.py: class ids or names -> a PNG per image and a grid, for conditional and unconditional configs, from
.pth, .safetensors and pipeline folders; the same images whatever the batch size; clear errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sample
from conftest import ROOT
from libs import load_config
from tiny_assets import write_config
from tiny_pipeline import write_digits_run, write_latent_run, write_unconditional_run


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    return write_digits_run(str(tmp_path_factory.mktemp('digits')))


@pytest.fixture(scope='module')
def latent(tmp_path_factory):
    return write_latent_run(str(tmp_path_factory.mktemp('latent')))


def run(config, nnet, out, *args):
    return sample.main(['--config', config, '--nnet_path', nnet, '--out', str(out), '--steps', '2', *args])


def read(folder):
    """{file name: pixels} of the image PNGs of a sample.py folder (the grid apart)."""
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))
            if name != 'grid.png'}


def test_images_and_a_grid_with_a_row_per_class(digits, tmp_path, capsys):
    run(digits['config'], digits['nnet'], tmp_path, '--classes', '0', '7', '--n-per-class', '3', '--seed', '1')
    images = read(tmp_path)
    assert list(images) == [f'{i:04d}_class{k}.png' for i, k in enumerate([0, 0, 0, 7, 7, 7])]
    assert all(im.shape == (16, 16) and im.dtype == np.uint8 for im in images.values())
    grid = np.asarray(Image.open(tmp_path / 'grid.png').convert('L'))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2)                        # torchvision's grid: 2 px padding
    for i, image in enumerate(images.values()):
        row, col = divmod(i, 3)
        assert np.array_equal(grid[2 + 18 * row:18 + 18 * row, 2 + 18 * col:18 + 18 * col], image)
    printed = capsys.readouterr().out
    assert f"6 images (dpm_solver, 2 steps, guidance 3.0, seed 1, cpu) in {tmp_path}; grid {tmp_path}/grid.png, " \
           "rows: 0, 7" in printed


def test_the_same_seed_and_classes_make_the_same_images_whatever_the_batch_size(digits, tmp_path):
    for batch in ('1', '4'):
        run(digits['config'], digits['nnet'], tmp_path / batch, '--classes', '3', '5', '--n-per-class', '3',
            '--batch-size', batch)
    one, four = read(tmp_path / '1'), read(tmp_path / '4')
    assert list(one) == list(four) and len({im.tobytes() for im in one.values()}) == 6
    # the images are equal up to the float rounding of batched matrix products
    assert max(np.abs(one[k].astype(int) - four[k]).max() for k in one) <= 1


def test_unconditional_config_one_row_and_ancestral_noise_per_image(tmp_path):
    paths = write_unconditional_run(str(tmp_path))
    config, nnet = paths['config'], paths['nnet']
    for batch in ('1', '3'):
        run(config, nnet, tmp_path / batch, '--n-per-class', '3', '--batch-size', batch)
    one, three = read(tmp_path / '1'), read(tmp_path / '3')
    assert list(one) == ['0000.png', '0001.png', '0002.png']
    assert max(np.abs(one[k].astype(int) - three[k]).max() for k in one) <= 1
    assert Image.open(tmp_path / '1' / 'grid.png').size == (3 * 10 + 2, 10 + 2)
    with pytest.raises(ValueError, match='uncond.py is unconditional: it takes no --classes'):
        run(config, nnet, tmp_path, '--classes', '1')
    with pytest.raises(ValueError, match='guidance needs a class-conditional model'):
        run(config, nnet, tmp_path, '--scale', '1.0')


def test_safetensors_files_and_pipeline_folders_make_the_same_images(latent, tmp_path):
    common = ('--classes', 'giant panda', '3', '--n-per-class', '2')
    run(latent['config'], latent['nnet'], tmp_path / 'pth', *common)
    safetensors = os.path.join(latent['pipeline'], 'transformer', 'diffusion_pytorch_model.safetensors')
    run(latent['config'], safetensors, tmp_path / 'safetensors', *common)
    # the folder's vae/ is the autoencoder: the config's may be absent
    config = load_config(latent['config'])
    config.autoencoder.pretrained_path = str(tmp_path / 'absent.pth')
    moved = write_config(tmp_path / 'moved.py', **config.to_dict())
    run(moved, latent['pipeline'], tmp_path / 'folder', *common)
    images = [read(tmp_path / kind) for kind in ('pth', 'safetensors', 'folder')]
    assert list(images[0]) == ['0000_class388.png', '0001_class388.png', '0002_class3.png', '0003_class3.png']
    assert all(np.array_equal(images[0][k], other[k]) for other in images[1:] for k in images[0])


def test_bad_requests_and_missing_files_are_named(latent, tmp_path):
    with pytest.raises(ValueError, match=r"no class named 'giant pnda'; closest names: 'giant panda' \(388\)"):
        run(latent['config'], latent['nnet'], tmp_path, '--classes', 'giant pnda')
    with pytest.raises(ValueError, match=r'give --classes \(ids or names\)'):
        run(latent['config'], latent['nnet'], tmp_path)
    config = load_config(latent['config'])
    config.autoencoder.pretrained_path = str(tmp_path / 'vae.pth')
    broken = write_config(tmp_path / 'broken.py', **config.to_dict())
    with pytest.raises(FileNotFoundError) as err:
        run(broken, str(tmp_path / 'nnet_ema.pth'), tmp_path, '--classes', '1')
    message = str(err.value)                                             # both at once, each with its source
    assert f"network weights not found: {tmp_path / 'nnet_ema.pth'}" in message and 'DiM-DiffusionMamba' in message
    assert f"VAE checkpoint not found: {tmp_path / 'vae.pth'}" in message and 'U-ViT' in message


@pytest.mark.parametrize('name', ['digits_DiM_tiny', 'cifar10_S_DiM', 'imagenet256_H_DiM', 'imagenet256_L_DiM',
                                  'imagenet512_H_DiM_ft', 'imagenet512_H_DiM_upsample_test',
                                  'imagenet512_H_DiM_upsample_3x_test'])
def test_every_config_is_understood_up_to_the_files_it_needs(name, tmp_path):
    """Flags, class names and sampler settings of every config pass; what stops the run is the weights file, named
    with its source (the released weights are not here)."""
    config = str(ROOT / 'configs' / f'{name}.py')
    classes = () if name.startswith('cifar10') else ('--classes', '1', '2') if name.startswith('digits') else \
        ('--classes', '207', 'otter', 'giant panda')
    with pytest.raises(FileNotFoundError, match=f"network weights not found: {tmp_path / 'nnet_ema.pth'}. The "
                                                "released DiM checkpoints"):
        sample.main(['--config', config, '--nnet_path', str(tmp_path / 'nnet_ema.pth'), '--out', str(tmp_path),
                     *classes])


def test_the_command_line(digits, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'sample.py'), f"--config={digits['config']}",
                          f"--nnet_path={digits['pipeline']}", '--classes', '1', '2', '--n-per-class', '2',
                          '--steps', '2', '--out', str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert 'sample: 100%' in out.stderr                                  # the progress bar
    assert out.stdout.strip().endswith(f"grid {tmp_path}/grid.png, rows: 1, 2")
    assert len(read(tmp_path)) == 4
