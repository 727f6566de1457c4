import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / 'tests' / 'data' / 'manifests').glob('manifest_*.json'))


def load_manifest(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
