"""Generate images of chosen classes with a trained DiM: a PNG per image and a grid with a row per class.

    python sample.py --config=configs/imagenet256_H_DiM.py --nnet_path=assets/dim/imagenet256_H_DiM/nnet_ema.pth \
        --classes 207 otter "giant panda" [--n-per-class 4] [--seed 0] [--steps 50] [--scale 0.4] [--out DIR]
    python sample.py --config=configs/digits_DiM_tiny.py \
        --nnet_path=workdir/digits_DiM_tiny/default/ckpts/1200.ckpt/nnet_ema.pth --classes 0 1 2 3 4 5 6 7 8 9

Classes are ids or names (libs/data/class_names.py); an unconditional config takes no --classes and makes one row.
--nnet_path is a .pth, a .safetensors file or a pipeline folder (scripts/convert_to_diffusers.py; its vae/ is then
the autoencoder). Image i of the request (class by class) comes from the noise of (seed, i), so the same seed and
classes make the same images whatever --batch-size, and the images of eval_ldm_discrete.py for the same labels.
"""
import argparse
import contextlib
import os

import torch
from torchvision.utils import save_image

from libs import SamplingSpec, load_config, load_network, sample_batches
from libs.config import check_top_level_keys, config_name
from libs.data.autoencoder import load_autoencoder
from libs.data.class_names import class_names, resolve_classes
from libs.evaluation.sample_files import png_array, write_png
from libs.evaluation.sample_scorer import to_uint8
from libs.files import FileChecks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Generate images of chosen classes with a trained DiM.')
    p.add_argument('--config', required=True, help='a configs/*.py file')
    p.add_argument('--nnet_path', required=True, help='network weights: .pth, .safetensors or a pipeline folder')
    p.add_argument('--classes', nargs='+', help='class ids or names (quote names with spaces)')
    p.add_argument('--n-per-class', type=int, default=4, help='images per class (a grid row)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--steps', type=int, help='sampler steps (default: config.sample.sample_steps)')
    p.add_argument('--scale', type=float, help='guidance s of eps_c + s (eps_c - eps_u) (default: config.sample.scale)')
    p.add_argument('--batch-size', type=int, help='images per network batch (default: config.sample.mini_batch_size)')
    p.add_argument('--precision', choices=('bf16', 'fp32'), default='bf16',
                   help='bf16 autocast of the network on a GPU (the CPU always runs fp32)')
    p.add_argument('--out', help='output folder (default: workdir/<config name>/sample_seed<seed>)')
    return p.parse_args(argv)


def autoencoder_path(config, nnet_path):
    """A pipeline folder's vae/ if it has one, else config.autoencoder.pretrained_path."""
    folder_vae = os.path.join(nnet_path, 'vae')
    return folder_vae if os.path.isdir(folder_vae) else config.autoencoder.pretrained_path


def main(argv=None):
    args = parse_args(argv)
    config = load_config(args.config)
    check_top_level_keys(config)
    spec = SamplingSpec.from_config(config).replace(seed=args.seed, sample_steps=args.steps, scale=args.scale,
                                                    mini_batch_size=args.batch_size)
    if args.n_per_class < 1:
        raise ValueError(f"--n-per-class={args.n_per_class}: must be >= 1")
    if spec.conditional != bool(args.classes):
        raise ValueError("give --classes (ids or names)" if spec.conditional else
                         f"{args.config} is unconditional: it takes no --classes")
    names = class_names(config, args.nnet_path)
    ids = resolve_classes(args.classes, names, spec.num_classes) if spec.conditional else [None]
    labels = torch.tensor(ids).repeat_interleave(args.n_per_class) if spec.conditional else None
    n = len(ids) * args.n_per_class

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    autocast = (contextlib.nullcontext if device == 'cpu' or args.precision == 'fp32' else
                lambda: torch.autocast('cuda', dtype=torch.bfloat16))
    load = FileChecks()
    nnet = load(load_network, config, args.nnet_path)
    autoencoder = None
    if config.get('autoencoder'):
        autoencoder = load(load_autoencoder, autoencoder_path(config, args.nnet_path), device=device)
    load.raise_if_missing()

    out = args.out or os.path.join('workdir', config_name(args.config), f'sample_seed{args.seed}')
    os.makedirs(out, exist_ok=True)
    images = []
    for indices, batch in sample_batches(nnet.to(device), spec, spec.index_batches(n), labels,
                                         autoencoder=autoencoder, autocast=autocast, progress=dict(desc='sample')):
        for i, image in zip(indices, to_uint8(batch)):
            label = '' if labels is None else f'_class{labels[i].item()}'
            write_png(png_array(image), os.path.join(out, f'{i:04d}{label}.png'))
            images.append(image)
    grid = os.path.join(out, 'grid.png')
    save_image(torch.stack(images).float() / 255, grid, nrow=args.n_per_class)
    rows = [names[k] if names else str(k) for k in ids] if spec.conditional else ['unconditional']
    print(f"{n} images ({spec.algorithm}, {spec.sample_steps} steps, guidance {spec.scale}, seed {spec.seed}, "
          f"{device}) in {os.path.abspath(out)}; grid {os.path.abspath(grid)}, rows: {', '.join(rows)}")
    return out


if __name__ == '__main__':
    main()
