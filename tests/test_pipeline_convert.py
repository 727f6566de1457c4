"""scripts/convert_to_diffusers.py and libs/pipeline/convert.py: a checkpoint (and its VAE, either format) -> a
pipeline folder with class names, and the folder -> the official nnet_ema.pth, bit for bit."""
import json
import os
import runpy

import pytest
import torch

from conftest import ROOT
from libs import load_config
from libs.data.autoencoder import load_autoencoder
from libs.pipeline import DiMPipeline
from tiny_assets import write_config
from tiny_pipeline import DIGITS, write_latent_run, write_upsample_config

convert = runpy.run_path(str(ROOT / 'scripts' / 'convert_to_diffusers.py'))['main']


@pytest.fixture(scope='module')
def latent(tmp_path_factory):
    return write_latent_run(str(tmp_path_factory.mktemp('latent')))


def test_checkpoint_to_folder_and_back(latent, tmp_path, capsys):
    folder = tmp_path / 'dim-tiny'
    convert(['--config', latent['config'], '--nnet_path', latent['nnet'], '--out', str(folder)])
    assert f"wrote pipeline folder {folder}: transformer " in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ['model_index.json', 'scheduler', 'transformer', 'vae']
    index = json.loads((folder / 'model_index.json').read_text())
    assert index['_class_name'] == 'DiMPipeline' and index['vae'] == ['diffusers', 'AutoencoderKL']
    assert len(index['id2label']) == 1000 and index['id2label']['207'] == 'golden retriever'
    assert (index['guidance_scale'], index['num_inference_steps'], index['conditional']) == (1.4, 3, True)
    assert json.loads((folder / 'scheduler' / 'scheduler_config.json').read_text())['algorithm'] == 'dpm_solver'
    assert json.loads((folder / 'vae' / 'config.json').read_text())['scaling_factor'] == 0.18215

    convert(['--to-pth', '--nnet_path', str(folder), '--out', str(tmp_path / 'nnet_ema.pth'),
             '--config', latent['config']])
    original, back = torch.load(latent['nnet']), torch.load(tmp_path / 'nnet_ema.pth')
    assert list(back) == list(original)                                  # the official keys, in their order
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_the_vae_in_either_format_gives_the_same_pipeline(latent, tmp_path):
    load_autoencoder(latent['vae'], device='cpu').vae.save_pretrained(tmp_path / 'vae-diffusers')
    for name, vae in (('a', latent['vae']), ('b', str(tmp_path / 'vae-diffusers'))):
        convert(['--config', latent['config'], '--nnet_path', latent['nnet'], '--autoencoder', vae,
                 '--out', str(tmp_path / name)])
    images = [DiMPipeline.from_pretrained(str(tmp_path / name))([1, 'otter'], generator=0, output_type='pt').images
              for name in ('a', 'b')]
    assert torch.equal(*images)


def test_pixel_space_config_has_no_vae(tmp_path):
    from libs import get_nnet
    torch.save(get_nnet(**load_config(DIGITS).nnet).state_dict(), tmp_path / 'nnet_ema.pth')
    convert(['--config', DIGITS, '--nnet_path', str(tmp_path / 'nnet_ema.pth'), '--out', str(tmp_path / 'digits')])
    index = json.loads((tmp_path / 'digits' / 'model_index.json').read_text())
    assert index['vae'] == [None, None] and index['id2label']['7'] == '7' and index['guidance_scale'] == 4.0
    with pytest.raises(ValueError, match="'digits' is a pixel-space config .* it takes no autoencoder"):
        convert(['--config', DIGITS, '--nnet_path', str(tmp_path / 'nnet_ema.pth'), '--autoencoder', 'vae.pth',
                 '--out', str(tmp_path / 'x')])


def test_what_the_converter_refuses(latent, tmp_path):
    with pytest.raises(ValueError, match='convert the 512 weights with configs/imagenet512_H_DiM_ft.py'):
        convert(['--config', write_upsample_config(str(tmp_path), latent), '--nnet_path', latent['nnet'],
                 '--out', str(tmp_path / 'x')])
    with pytest.raises(FileNotFoundError) as err:                      # both at once, each with its source
        convert(['--config', latent['config'], '--nnet_path', str(tmp_path / 'nnet.pth'), '--autoencoder',
                 str(tmp_path / 'vae.pth'), '--out', str(tmp_path / 'x')])
    assert f"network weights not found: {tmp_path / 'nnet.pth'}. The released DiM checkpoints" in str(err.value)
    assert f"VAE checkpoint not found: {tmp_path / 'vae.pth'}. The KL-f8" in str(err.value)
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder: pass the weights file inside it"):
        convert(['--to-pth', '--nnet_path', str(tmp_path), '--out', str(tmp_path / 'n.pth')])
    convert(['--config', latent['config'], '--nnet_path', latent['nnet'], '--out', str(tmp_path / 'ok')])
    config = load_config(latent['config'])
    config.nnet.attention_head_dim = 48
    wider = write_config(tmp_path / 'wider.py', **config.to_dict())
    with pytest.raises(RuntimeError, match='shape mismatches'):
        convert(['--to-pth', '--nnet_path', str(tmp_path / 'ok'), '--out', str(tmp_path / 'n.pth'), '--config', wider])
    assert not os.path.exists(tmp_path / 'n.pth')
