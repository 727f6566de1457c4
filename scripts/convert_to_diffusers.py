"""A released DiM checkpoint -> a diffusers pipeline folder (DiMPipeline, weights in safetensors), and back.

    python scripts/convert_to_diffusers.py --config configs/imagenet256_H_DiM.py \
        --nnet_path assets/dim/imagenet256_H_DiM/nnet_ema.pth [--autoencoder PATH] --out dim-imagenet256
    python scripts/convert_to_diffusers.py --to-pth --nnet_path dim-imagenet256 --out nnet_ema.pth [--config C]

The folder holds model_index.json (class names as id2label, the config's guidance and steps), transformer/
(config.json + diffusion_pytorch_model.safetensors, the official keys), scheduler/ (the config's sampler) and, for
latent configs, vae/ (the autoencoder of --autoencoder or config.autoencoder.pretrained_path, an LDM .pth or a
diffusers folder). --to-pth writes the folder's backbone as the official state dict, which eval_ldm_discrete.py and
train configs read; the folder's vae/ serves as config.autoencoder.pretrained_path as it is.
"""
import argparse
import os

import torch

from libs.config import load_config
from libs.model.weights import load_network
from libs.pipeline.convert import pipeline_from_config, state_dict_of_folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='DiM checkpoint <-> diffusers pipeline folder.')
    p.add_argument('--config', help='the checkpoint\'s configs/*.py file (required, except with --to-pth)')
    p.add_argument('--nnet_path', required=True, help='nnet_ema.pth (or .safetensors); with --to-pth the folder')
    p.add_argument('--autoencoder', help='the VAE (default: config.autoencoder.pretrained_path)')
    p.add_argument('--out', required=True, help='the pipeline folder; with --to-pth the .pth file')
    p.add_argument('--to-pth', action='store_true', help='folder -> official state dict (nnet_ema.pth)')
    return p.parse_args(argv)


def to_pth(folder, out, config_path=None):
    state = state_dict_of_folder(folder)
    if config_path:                                   # the official scripts must load it: check it as they do
        load_network(load_config(config_path), folder)
    torch.save(state, out)
    print(f"wrote {os.path.abspath(out)}: {len(state)} tensors, "
          f"{sum(v.numel() for v in state.values()):,} parameters")


def to_folder(config_path, nnet_path, autoencoder, out):
    pipe = pipeline_from_config(load_config(config_path), nnet_path, autoencoder)
    pipe.save_pretrained(out, safe_serialization=True)
    parts = [f"transformer {sum(p.numel() for p in pipe.transformer.parameters()):,} parameters",
             f"scheduler {pipe.scheduler.config.algorithm}, {pipe.config.num_inference_steps} steps, "
             f"guidance_scale {pipe.config.guidance_scale}",
             'vae none (pixel space)' if pipe.vae is None else
             f"vae {sum(p.numel() for p in pipe.vae.parameters()):,} parameters",
             f"{len(pipe.labels)} class names" if pipe.labels else 'no class names']
    print(f"wrote pipeline folder {os.path.abspath(out)}: " + '; '.join(parts))


def main(argv=None):
    args = parse_args(argv)
    if args.to_pth:
        if args.autoencoder:
            raise ValueError("--to-pth writes the backbone only; the folder's vae/ is read as it is (no --autoencoder)")
        to_pth(args.nnet_path, args.out, args.config)
    elif not args.config:
        raise ValueError("--config is required to make a pipeline folder")
    else:
        to_folder(args.config, args.nnet_path, args.autoencoder, args.out)


if __name__ == '__main__':
    main()
