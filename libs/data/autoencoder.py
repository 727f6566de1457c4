"""Frozen KL autoencoder (the Stable-Diffusion "KL-f8" VAE) on top of diffusers' ``AutoencoderKL``.

The official checkpoints (``assets/stable-diffusion/autoencoder_kl_ema.pth``) are bare state dicts in the original
LDM key naming. They are renamed with diffusers' own converter and loaded strictly; a diffusers-format folder
(``config.json`` + weights) is accepted as well. Latents are ``scale_factor * z`` with z the posterior sample.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from libs.files import load_torch_file

SCALE_FACTOR = 0.18215
SOURCE_HINT = (
    "The KL-f8 autoencoder files (autoencoder_kl_ema.pth, autoencoder_kl.pth) are in the stable-diffusion/ folder "
    "of U-ViT's Google Drive "
    "(https://drive.google.com/drive/folders/1yo-XhqbPue3rp5P57j6QbA5QZx6KybvP, linked from the README of "
    "https://github.com/baofff/U-ViT); put that folder at assets/stable-diffusion/"
)
# The SD KL-f8 autoencoder: 248 tensors, 83,653,863 parameters.
KL_F8 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, in_channels=3, out_channels=3,
             latent_channels=4)


def ldm_vae_layout(block_out_channels=KL_F8["block_out_channels"], layers_per_block=KL_F8["layers_per_block"],
                   in_channels=3, out_channels=3, latent_channels=4) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an LDM ``AutoencoderKL`` state dict (no attention outside the mid blocks, double_z)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, c_out, c_in, k):
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resblock(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def mid(name, c):
        resblock(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{proj}", c, c, 1)
        resblock(f"{name}.block_2", c, c)

    chans = list(block_out_channels)
    top = chans[-1]
    conv("encoder.conv_in", chans[0], in_channels, 3)
    c_in = chans[0]
    for i, c in enumerate(chans):
        for j in range(layers_per_block):
            resblock(f"encoder.down.{i}.block.{j}", c_in, c)
            c_in = c
        if i < len(chans) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder.mid", top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", 2 * latent_channels, top, 3)
    conv("quant_conv", 2 * latent_channels, 2 * latent_channels, 1)
    conv("post_quant_conv", latent_channels, latent_channels, 1)
    conv("decoder.conv_in", top, latent_channels, 3)
    mid("decoder.mid", top)
    c_in = top
    for i in reversed(range(len(chans))):
        for j in range(layers_per_block + 1):
            resblock(f"decoder.up.{i}.block.{j}", c_in, chans[i])
            c_in = chans[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", chans[i], chans[i], 3)
    norm("decoder.norm_out", chans[0])
    conv("decoder.conv_out", out_channels, chans[0], 3)
    return shapes


def infer_ldm_vae_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Architecture of an LDM VAE state dict, read from its shapes (KL-f8 values where keys are absent)."""
    def dim(key, axis, default):
        return state_dict[key].shape[axis] if key in state_dict else default

    chans = []
    while f"encoder.down.{len(chans)}.block.0.conv1.weight" in state_dict:
        chans.append(state_dict[f"encoder.down.{len(chans)}.block.0.conv1.weight"].shape[0])
    layers = 0
    while f"encoder.down.0.block.{layers}.conv1.weight" in state_dict:
        layers += 1
    return dict(
        block_out_channels=tuple(chans) or KL_F8["block_out_channels"],
        layers_per_block=layers or KL_F8["layers_per_block"],
        in_channels=dim("encoder.conv_in.weight", 1, 3),
        out_channels=dim("decoder.conv_out.weight", 0, 3),
        latent_channels=dim("decoder.conv_in.weight", 1, 4),
    )


def _check_layout(state_dict: Mapping[str, torch.Tensor], arch: dict, path: str) -> None:
    expected = ldm_vae_layout(**arch)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(f"{k}: {tuple(state_dict[k].shape)} (expected {expected[k]})"
                   for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    if not (missing or unexpected or wrong):
        return

    def listing(title, items, limit=20):
        more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
        return f"{len(items)} {title}: {', '.join(items[:limit])}{more}" if items else ""

    parts = [listing("missing keys", missing), listing("unexpected keys", unexpected), listing("shape mismatches", wrong)]
    raise ValueError(f"{path} is not an LDM KL autoencoder state dict for {arch}; "
                     + "; ".join(p for p in parts if p))


def _diffusers_config(arch: dict, scale_factor: float) -> dict:
    n = len(arch["block_out_channels"])
    return dict(
        in_channels=arch["in_channels"], out_channels=arch["out_channels"],
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch["block_out_channels"]), layers_per_block=arch["layers_per_block"],
        latent_channels=arch["latent_channels"], norm_num_groups=32, sample_size=256, scaling_factor=scale_factor,
    )


def vae_from_ldm_state_dict(state_dict: Mapping[str, torch.Tensor], scale_factor: float = SCALE_FACTOR,
                            name: str = "state dict") -> AutoencoderKL:
    """diffusers ``AutoencoderKL`` holding an LDM-named state dict (architecture inferred, strict load)."""
    arch = infer_ldm_vae_config(state_dict)
    _check_layout(state_dict, arch, name)
    config = _diffusers_config(arch, scale_factor)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(state_dict), config), strict=True)
    return vae


def _load_vae(path: str, scale_factor: float) -> AutoencoderKL:
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} is a folder but not a diffusers AutoencoderKL folder (no config.json)")
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE checkpoint not found: {path}. {SOURCE_HINT}")
    state_dict = load_torch_file(path)
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a bare state dict (name -> tensor) of an LDM KL autoencoder")
    return vae_from_ldm_state_dict(state_dict, scale_factor, name=path)


class FrozenAutoencoder(nn.Module):
    """Frozen, eval-mode KL autoencoder. Images (B,3,H,W) in [-1,1] <-> latents (B,4,H/8,W/8) (KL-f8 sizes).

    Inputs must be on the module's device. Every method runs over the batch in chunks of ``chunk_size``.
    """

    def __init__(self, vae: AutoencoderKL, scale_factor: float = SCALE_FACTOR):
        super().__init__()
        self.vae = vae
        self.scale_factor = scale_factor
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: stays in eval mode whatever a parent module asks

    def latent_shape(self, image_shape: tuple) -> tuple:
        """(C, h, w) of the latents of (3, H, W) images: C latent channels, H and W divided by 2 per down block."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, H, W = image_shape
        return (self.vae.config.latent_channels, H // factor, W // factor)

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor, chunk_size: int = 25) -> torch.Tensor:
        """(B,3,H,W) images -> (B,2C,h,w) posterior moments [mean | logvar] (logvar not clamped)."""
        return torch.cat([self.vae.encode(c).latent_dist.parameters for c in x.split(chunk_size)])

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,2C,h,w) moments -> (B,C,h,w) latents ``scale_factor * (mean + std * eps)``."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (mean + std * eps)

    def encode(self, x: torch.Tensor, mode: str = "sample", generator: torch.Generator | None = None,
               chunk_size: int = 25) -> torch.Tensor:
        """(B,3,H,W) images -> (B,C,h,w) scaled latents: a posterior sample (``'sample'``) or its mean (``'mean'``)."""
        if mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        moments = self.encode_moments(x, chunk_size)
        if mode == "mean":
            return self.scale_factor * moments.chunk(2, dim=1)[0]
        return self.sample(moments, generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, chunk_size: int = 25) -> torch.Tensor:
        """(B,C,h,w) scaled latents -> (B,3,8h,8w) images, roughly in [-1,1] (not clamped)."""
        z = z / self.scale_factor
        return torch.cat([self.vae.decode(c).sample for c in z.split(chunk_size)])


def load_autoencoder(path: str, scale_factor: float = SCALE_FACTOR,
                     device: torch.device | str | None = None) -> FrozenAutoencoder:
    """Frozen autoencoder from an LDM-format ``.pth`` state dict or a local diffusers folder.

    ``device`` defaults to CUDA when available, else CPU. Raises FileNotFoundError (naming the file and where to get
    it) when ``path`` does not exist, ValueError listing missing/unexpected keys when the state dict does not fit.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return FrozenAutoencoder(_load_vae(os.fspath(path), scale_factor), scale_factor).to(device)
