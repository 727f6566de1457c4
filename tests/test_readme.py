"""The README's code: the "From Python" examples run as written (a randomly initialised digits network stands in
for the trained checkpoint they name)."""
import os
import re

import numpy as np
import torch
from PIL import Image

import sample
from conftest import ROOT
from libs import get_nnet, load_config
from tiny_pipeline import write_digits_run

README = (ROOT / 'README.md').read_text()


def python_block(section, n=0):
    """The n-th ```python block after the heading `section`."""
    start = README.index(section)
    return re.findall(r"```python\n(.*?)```", README[start:], re.S)[n]


def test_use_from_python_example_runs(tmp_path, monkeypatch):
    code = python_block('### From Python')
    path = re.search(r"load_network\(config, '([^']+)'\)", code).group(1)
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    torch.manual_seed(0)
    (tmp_path / path).parent.mkdir(parents=True)
    torch.save(get_nnet(**config.nnet).state_dict(), tmp_path / path)
    (tmp_path / 'configs').symlink_to(ROOT / 'configs')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, 'README.md', 'exec'), scope)
    images = scope['images']
    assert images.shape == (3, 1, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
    assert len(code.strip().splitlines()) <= 10


def test_the_diffusers_example_runs_and_gives_the_images_of_sample_py(tmp_path, monkeypatch):
    code = python_block('### From Python', n=1)
    folder = re.search(r"from_pretrained\('([^']+)'\)", code).group(1)
    paths = write_digits_run(str(tmp_path / 'run'), steps=15)          # the digits config's own 15 steps
    os.rename(paths['pipeline'], tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, 'README.md', 'exec'), scope)
    images = [np.asarray(im) for im in scope['images']]
    sample.main(['--config', paths['config'], '--nnet_path', paths['nnet'], '--classes', '3', '7', '--n-per-class',
                 '1', '--seed', '0', '--out', str(tmp_path / 'sample')])
    expected = [np.asarray(Image.open(tmp_path / 'sample' / name)) for name in ('0000_class3.png', '0001_class7.png')]
    assert [im.shape for im in images] == [(16, 16)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(images, expected))
