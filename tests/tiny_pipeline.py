"""What the image tests share, written by the tests (nothing downloaded): a tiny random latent DiM run with ImageNet's
1,000 classes (weights, config file, tiny LDM VAE with 4x4x4 latents -> 8x8 images, FID assets) and the digits
config with random weights, as checkpoints and as pipeline folders."""
import os

import numpy as np
import torch

from conftest import ROOT
from libs import get_nnet, load_config
from libs.pipeline.convert import pipeline_from_config
from tiny_assets import write_config, write_scoring_assets

TINY = dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=5, in_channels=4, out_channels=4, patch_size=2,
            sample_size=4, num_embeds_ada_norm=1000)
DIGITS = str(ROOT / 'configs' / 'digits_DiM_tiny.py')
SEED, STEPS, SCALE, BATCH = 7, 3, 0.4, 3


def write_latent_run(root, **sample):
    """{'config', 'nnet', 'vae', 'inception', 'stats', 'pipeline'}: paths of a tiny latent run under `root`
    (dpm_solver, 3 steps, guidance 0.4, batches of 3, 5 samples; `sample` overrides config.sample) and its pipeline
    folder."""
    paths = write_scoring_assets(root)
    paths.update(nnet=os.path.join(root, 'ckpts', '10.ckpt', 'nnet_ema.pth'), stats=os.path.join(root, 'stats.npz'))
    os.makedirs(os.path.dirname(paths['nnet']), exist_ok=True)
    torch.manual_seed(0)
    torch.save(get_nnet(**TINY).state_dict(), paths['nnet'])
    np.savez(paths['stats'], mu=np.zeros(2048), sigma=np.eye(2048))
    paths['config'] = write_config(
        os.path.join(root, 'tiny_latent.py'), seed=SEED, z_shape=(4, 4, 4),
        autoencoder=dict(pretrained_path=paths['vae']), nnet=TINY,
        dataset=dict(name='imagenet256_features', path='unused', fid_stat=paths['stats']),
        sample=dict(dict(sample_steps=STEPS, n_samples=5, mini_batch_size=BATCH, algorithm='dpm_solver', cfg=True,
                         scale=SCALE, path='', inception_path=paths['inception']), **sample))
    paths['pipeline'] = os.path.join(root, 'dim-tiny')
    pipeline_from_config(load_config(paths['config']), paths['nnet']).save_pretrained(paths['pipeline'])
    return paths


def write_upsample_config(root, paths, multi_times=2, **nnet):
    """A tiny copy of configs/imagenet512_H_DiM_upsample_test.py for the run of `write_latent_run`; its path."""
    base, p = TINY['sample_size'], TINY['patch_size']
    latent = base * multi_times
    grids = [(latent // p) ** 2, (latent // 2 // p) ** 2, (base // p) ** 2]
    return write_config(
        os.path.join(root, f'tiny_upsample_{multi_times}x.py'), seed=SEED, z_shape=(4, latent, latent),
        autoencoder=dict(pretrained_path=paths['vae']),
        nnet=dict(TINY, sample_size=latent, multi_times=multi_times, num_patches=grids, is_skip_tune=True,
                  skip_tune_param=(0.82, 1.0), **nnet),
        dataset=dict(name='imagenet512_features', path='unused', fid_stat=paths['stats']),
        sample=dict(sample_steps=STEPS, n_samples=2, mini_batch_size=BATCH, algorithm='dpm_solver_upsample_g',
                    cfg=True, scale=3.0, ug_theta=1.0, ug_eta=0.3, ug_T=1.0, path=''))


def write_digits_run(root, steps=2):
    """{'config', 'nnet', 'pipeline'}: the digits config with random weights (the quick start's network untrained)
    and its pipeline folder, `steps` sampler steps."""
    config = load_config(DIGITS)
    torch.manual_seed(0)
    os.makedirs(root, exist_ok=True)
    nnet = os.path.join(root, 'nnet_ema.pth')
    torch.save(get_nnet(**config.nnet).state_dict(), nnet)
    config.sample.sample_steps = steps
    pipeline = os.path.join(root, 'dim-digits')
    pipeline_from_config(config, nnet).save_pretrained(pipeline)
    return dict(config=DIGITS, nnet=nnet, pipeline=pipeline)


def write_unconditional_run(root):
    """{'config', 'nnet'}: a tiny unconditional pixel-space run (3x8x8, CIFAR-10's data set, the ancestral sampler
    as the CIFAR-10 config) with random weights."""
    nnet = dict(TINY, in_channels=3, out_channels=3, sample_size=8, num_embeds_ada_norm=10)
    config = write_config(os.path.join(root, 'uncond.py'), seed=0, z_shape=(3, 8, 8), nnet=nnet,
                          train=dict(mode='uncond'), dataset=dict(name='cifar10', path='unused'),
                          sample=dict(sample_steps=1000, mini_batch_size=2, algorithm='euler_maruyama'))
    torch.manual_seed(0)
    torch.save(get_nnet(**nnet).state_dict(), os.path.join(root, 'nnet.pth'))
    return dict(config=config, nnet=os.path.join(root, 'nnet.pth'))
