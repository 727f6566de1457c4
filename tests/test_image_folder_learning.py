"""A tiny pixel-space DiM learns an image folder: coloured shapes, one class per colour, in assorted sizes and file
formats. Samples of class k are scored by their dominant colour (tests/image_folders.py: the palette colour of most
non-grey pixels), far above chance (1/4)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from image_folders import PALETTE, dominant_classes, folder_config, write_shapes
from libs import SamplingSpec, load_config, load_network, sample_images

STEPS = 400
PER_CLASS = 40              # images per class, sides 12..48 px, centre-cropped to 16 px
SAMPLES_PER_CLASS = 25
THRESHOLD = 0.7             # measured 0.99 at 400 steps (docs/own-images.md); chance is 0.25


def learning_config(path, images):
    """The digits demo's network and recipe (configs/digits_DiM_tiny.py) on 16 px RGB shapes, with an EMA of a
    horizon (about 50 steps) short enough for a 400-step run to leave the untrained weights behind."""
    return folder_config(
        path, images, len(PALETTE), width=96, depth=7,
        train=dict(n_steps=STEPS, batch_size=64, log_interval=50, eval_interval=STEPS, save_interval=STEPS,
                   ema_rate=0.98),
        optimizer=dict(lr=2e-3),
        lr_scheduler=dict(warmup_steps=100),
        sample=dict(sample_steps=15, cfg=True, scale=3.0, mini_batch_size=50))


def shape_accuracy(config_path, nnet_path, seed=0):
    """(accuracy, per-class accuracy) of SAMPLES_PER_CLASS samples of each class, scored by dominant colour."""
    config = load_config(config_path)
    nnet = load_network(config, nnet_path)
    labels = torch.arange(len(PALETTE)).repeat_interleave(SAMPLES_PER_CLASS)
    images = sample_images(nnet, SamplingSpec.from_config(config), labels=labels, seed=seed)
    correct = dominant_classes(images, tuple(PALETTE)) == labels
    return correct.float().mean().item(), [c.float().mean().item() for c in correct.split(SAMPLES_PER_CLASS)]


@pytest.mark.slow
def test_a_tiny_dim_learns_coloured_shapes_from_an_image_folder(tmp_path):
    write_shapes(tmp_path / 'images', per_class=PER_CLASS, sizes=(12, 48))
    config = learning_config(tmp_path / 'config.py', tmp_path / 'images')
    env = dict(os.environ, WANDB_MODE='disabled', XDG_CACHE_HOME=str(tmp_path / 'xdg_cache'), OMP_NUM_THREADS='1')
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / 'train_ldm_discrete.py'), f'--config={config}',
                           f'--workdir={tmp_path}/run'], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_s = time.time() - start
    accuracy, per_class = shape_accuracy(config, str(tmp_path / 'run' / 'ckpts' / f'{STEPS}.ckpt' / 'nnet_ema.pth'))
    print(f'shape accuracy {accuracy:.3f} (per class {[round(a, 2) for a in per_class]}) after {STEPS} steps; '
          f'training {train_s:.0f} s, in all {time.time() - start:.0f} s')
    assert accuracy >= THRESHOLD, per_class
    assert min(per_class) >= 0.4, per_class                    # every class, not a few of them
