"""Files the end-to-end tests hand to the scripts: config modules written from plain values, and the random tiny
VAE + FID Inception that latent sampling and scoring load (nothing downloaded)."""
import os

import torch

from test_data_autoencoder import SMALL, random_ldm_state_dict
from test_evaluation_fid import random_inception_state_dict

HEADER = '''import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
'''


def write_config(path, **fields) -> str:
    """Write a config module whose get_config() holds `fields` (dict values become nested ConfigDicts); its path."""
    lines = [HEADER]
    for key, value in fields.items():
        text = f'ml_collections.ConfigDict({value!r})' if isinstance(value, dict) else repr(value)
        lines.append(f'    config.{key} = {text}\n')
    lines.append('    return config\n')
    with open(path, 'w') as f:
        f.write(''.join(lines))
    return str(path)


def write_scoring_assets(root) -> dict[str, str]:
    """A tiny LDM-format VAE (4x4x4 latents -> 8x8 images) and random FID Inception weights under `root`:
    {'vae': path, 'inception': path}."""
    paths = {'vae': os.path.join(root, 'autoencoder_kl_ema.pth'), 'inception': os.path.join(root, 'pt_inception.pth')}
    torch.manual_seed(0)
    torch.save(random_ldm_state_dict(**SMALL), paths['vae'])
    torch.save(random_inception_state_dict(), paths['inception'])
    return paths
