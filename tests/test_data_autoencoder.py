"""libs.data.autoencoder: LDM-format KL VAE checkpoints loaded into diffusers' AutoencoderKL (no downloads)."""
import math

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from libs.data.autoencoder import (KL_F8, SCALE_FACTOR, infer_ldm_vae_config, ldm_vae_layout, load_autoencoder)

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1)  # 16x16 images <-> 8x8 latents


def random_ldm_state_dict(seed=0, **arch):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in ldm_vae_layout(**arch).items():
        if len(shape) == 4:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif "norm" in key and key.endswith("weight"):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "autoencoder_kl_ema.pth"
    sd = random_ldm_state_dict(**SMALL)
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def small_vae(small_ckpt):
    return load_autoencoder(small_ckpt[0], device="cpu")


def images(n=3, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_kl_f8_layout_matches_spec_and_diffusers_without_allocating():
    layout = ldm_vae_layout()
    assert len(layout) == 248
    assert sum(math.prod(s) for s in layout.values()) == 83_653_863
    assert layout["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert layout["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert layout["quant_conv.weight"] == (8, 8, 1, 1) and layout["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert layout["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert "encoder.down.3.downsample.conv.weight" not in layout and "decoder.up.0.upsample.conv.weight" not in layout

    n = len(KL_F8["block_out_channels"])
    config = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                  block_out_channels=KL_F8["block_out_channels"], layers_per_block=2, latent_channels=4)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
        ldm = {k: torch.empty(s) for k, s in layout.items()}
    target = vae.state_dict()
    assert len(target) == 248 and sum(v.numel() for v in target.values()) == 83_653_863
    vae.load_state_dict(convert_ldm_vae_checkpoint(ldm, config), strict=True, assign=True)
    assert infer_ldm_vae_config(ldm) == KL_F8


def test_loads_ldm_checkpoint_strictly_and_frozen(small_ckpt, small_vae):
    _, sd = small_ckpt
    vae = small_vae.vae
    assert tuple(vae.config.block_out_channels) == SMALL["block_out_channels"]
    assert vae.config.layers_per_block == SMALL["layers_per_block"]
    torch.testing.assert_close(vae.encoder.conv_in.weight, sd["encoder.conv_in.weight"], rtol=0, atol=0)
    torch.testing.assert_close(vae.decoder.mid_block.attentions[0].to_q.weight,
                               sd["decoder.mid.attn_1.q.weight"][:, :, 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(vae.decoder.up_blocks[1].resnets[0].conv_shortcut.weight,  # LDM up levels are reversed
                               sd["decoder.up.0.block.0.nin_shortcut.weight"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in small_vae.parameters())
    assert not small_vae.train().training and not vae.training


def test_encode_decode_shapes_and_chunking(small_vae):
    x = images()
    moments = small_vae.encode_moments(x)
    assert moments.shape == (3, 8, 8, 8)
    torch.testing.assert_close(small_vae.encode_moments(x, chunk_size=2), moments)
    z = small_vae.encode(x)
    assert z.shape == (3, 4, 8, 8)
    out = small_vae.decode(z)
    assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(small_vae.decode(z, chunk_size=1), out)


def test_scale_factor_sampling_and_decode(small_vae):
    x = images()
    moments = small_vae.encode_moments(x)
    mean, logvar = moments.chunk(2, dim=1)
    torch.testing.assert_close(small_vae.encode(x, mode="mean"), SCALE_FACTOR * mean)

    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expected = SCALE_FACTOR * (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps)
    torch.testing.assert_close(small_vae.sample(moments, torch.Generator().manual_seed(7)), expected)
    torch.testing.assert_close(small_vae.encode(x, generator=torch.Generator().manual_seed(7)), expected)

    huge = torch.cat([torch.zeros_like(mean), torch.full_like(logvar, 100.0)], dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(small_vae.sample(huge, torch.Generator().manual_seed(3)),
                               SCALE_FACTOR * math.exp(10) * eps)  # logvar clamped at 20

    z = small_vae.encode(x, mode="mean")
    torch.testing.assert_close(small_vae.decode(z), small_vae.vae.decode(z / SCALE_FACTOR).sample)
    with pytest.raises(ValueError, match="mode"):
        small_vae.encode(x, mode="median")


def test_other_scale_factor(small_ckpt, small_vae):
    unit = load_autoencoder(small_ckpt[0], scale_factor=1.0, device="cpu")
    x = images()
    torch.testing.assert_close(unit.encode(x, mode="mean") * SCALE_FACTOR, small_vae.encode(x, mode="mean"))
    z = small_vae.encode(x, mode="mean")
    torch.testing.assert_close(unit.decode(z / SCALE_FACTOR), small_vae.decode(z))


def test_diffusers_folder(tmp_path, small_vae):
    small_vae.vae.save_pretrained(tmp_path / "vae")
    loaded = load_autoencoder(tmp_path / "vae", device="cpu")
    z = small_vae.encode(images(), mode="mean")
    torch.testing.assert_close(loaded.decode(z), small_vae.decode(z))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_autoencoder(tmp_path, device="cpu")


def test_missing_file_names_it_and_its_source(tmp_path):
    path = tmp_path / "autoencoder_kl_ema.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_autoencoder(path)
    assert str(path) in str(err.value)
    assert "stable-diffusion/" in str(err.value) and "U-ViT" in str(err.value)


def test_wrong_keys_are_listed(tmp_path, small_ckpt):
    sd = dict(small_ckpt[1])
    del sd["decoder.mid.attn_1.k.bias"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["quant_conv.bias"] = torch.zeros(5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_autoencoder(tmp_path / "bad.pth", device="cpu")
    msg = str(err.value)
    assert "decoder.mid.attn_1.k.bias" in msg and "encoder.extra.weight" in msg and "quant_conv.bias" in msg

    torch.save({"blocks.0.weight": torch.zeros(2)}, tmp_path / "nnet.pth")
    with pytest.raises(ValueError, match="248 missing keys.*1 unexpected keys: blocks.0.weight"):
        load_autoencoder(tmp_path / "nnet.pth", device="cpu")
