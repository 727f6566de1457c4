"""The README's code: the "From Python" example runs as written (a randomly initialised digits network stands in
for the trained checkpoint it names)."""
import re

import torch

from conftest import ROOT
from libs import get_nnet, load_config

README = (ROOT / 'README.md').read_text()


def python_block(section):
    """The first ```python block after the heading `section`."""
    start = README.index(section)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)


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
