"""DiMTransformer2DModel: a diffusers model with the official state dict; save -> load round trips, both formats."""
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MANIFESTS, ROOT, load_manifest
from libs import get_nnet, load_config
from libs.model.build import DEFAULTS
from libs.model.weights import load_network, load_nnet_weights
from libs.pipeline.transformer import DiMTransformer2DModel
from tiny_assets import write_config

TINY = dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=3, in_channels=1, out_channels=1, patch_size=2,
            sample_size=8, num_embeds_ada_norm=10)
CONFIGS = {p.stem.replace('manifest_', ''): p for p in MANIFESTS}


def layout(model):
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def outputs(model):
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([3.0, 900.0]), torch.tensor([0, 10])
    with torch.no_grad():
        return model(x, t, y)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_the_official_state_dict_of_every_config(name):
    manifest = load_manifest(CONFIGS[name])
    official = [(k, s) for k, s, _ in manifest['state_dict']]                 # keys, shapes and order
    config = load_config(str(ROOT / 'configs' / f'{name}.py'))
    with torch.device('meta'):
        assert layout(DiMTransformer2DModel.from_nnet_config(config.nnet)) == official
        assert layout(DiMTransformer2DModel.from_nnet_config(manifest['nnet_config'])) == official


def test_it_is_the_dim_of_the_same_arguments_and_registers_them_in_full():
    torch.manual_seed(0)
    model = DiMTransformer2DModel.from_nnet_config(TINY)
    torch.manual_seed(0)
    plain = get_nnet(**TINY)
    assert layout(model) == layout(plain)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert torch.equal(outputs(model.eval()), outputs(plain.eval()))
    assert dict(model.config, _use_default_values=None) == dict(
        _use_default_values=None, name='Mamba_DiT_S_2', num_attention_heads=1, attention_head_dim=32, num_layers=3,
        patch_size=2, in_channels=1, out_channels=1, num_embeds_ada_norm=10, sample_size=8, num_patches=None,
        mamba_d_state=16, mamba_d_conv=3, mamba_expand=2, encoder_start_blk_id=1,
        pad_token_schedules=['dec_split', 'lateral'], multi_times=1, is_skip_tune=False, skip_tune_param=[0.82, 1.0],
        skip_tune_schedule='official')
    defaults = {k: p.default for k, p in inspect.signature(DiMTransformer2DModel.__init__).parameters.items()
                if k in DEFAULTS}
    assert defaults == DEFAULTS                          # the constructor's defaults are build.py's


def test_save_pretrained_and_pth_round_trips_are_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = DiMTransformer2DModel.from_nnet_config(TINY).eval()
    model.save_pretrained(tmp_path / 'folder')
    assert sorted(p.name for p in (tmp_path / 'folder').iterdir()) == ['config.json',
                                                                       'diffusion_pytorch_model.safetensors']
    assert json.loads((tmp_path / 'folder' / 'config.json').read_text())['_class_name'] == 'DiMTransformer2DModel'
    loaded = DiMTransformer2DModel.from_pretrained(tmp_path / 'folder')
    saved = load_file(tmp_path / 'folder' / 'diffusion_pytorch_model.safetensors')
    assert list(saved) == sorted(model.state_dict())                          # the official keys, no prefix
    for state in (loaded.state_dict(), saved):
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(outputs(loaded.eval()), outputs(model))

    torch.save(model.state_dict(), tmp_path / 'nnet_ema.pth')                 # a released-style .pth, strict
    from_pth = load_nnet_weights(DiMTransformer2DModel.from_nnet_config(TINY), str(tmp_path / 'nnet_ema.pth'))
    assert all(torch.equal(a, b) for a, b in zip(from_pth.state_dict().values(), model.state_dict().values()))


def test_the_scripts_read_safetensors_files_and_folders(tmp_path):
    torch.manual_seed(0)
    model = DiMTransformer2DModel.from_nnet_config(TINY).eval()
    model.save_pretrained(tmp_path / 'folder')
    config = load_config(write_config(tmp_path / 'c.py', nnet=TINY))
    for path in (tmp_path / 'folder', tmp_path / 'folder' / 'diffusion_pytorch_model.safetensors'):
        assert torch.equal(outputs(load_network(config, str(path))), outputs(model))


def test_missing_or_extra_weights_are_errors_naming_them(tmp_path):
    model = DiMTransformer2DModel.from_nnet_config(TINY)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / 'diffusion_pytorch_model.safetensors')
    state.pop('label_emb.weight')
    state['extra.weight'] = torch.zeros(1)
    save_file(state, tmp_path / 'diffusion_pytorch_model.safetensors')
    with pytest.raises(RuntimeError, match=r"missing_keys.*label_emb.weight.*unexpected_keys.*extra.weight"):
        DiMTransformer2DModel.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"missing keys \(1\): \['label_emb.weight'\]"):
        load_nnet_weights(get_nnet(**TINY), str(tmp_path))
    (tmp_path / 'diffusion_pytorch_model.safetensors').write_bytes(b'not safetensors')
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is not a readable safetensors file"):
        load_nnet_weights(get_nnet(**TINY), str(tmp_path))
    (tmp_path / 'diffusion_pytorch_model.safetensors').unlink()
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder: pass the weights file inside it .*, or a "
                                         "diffusers folder with transformer/diffusion_pytorch_model.safetensors"):
        load_nnet_weights(get_nnet(**TINY), str(tmp_path))
