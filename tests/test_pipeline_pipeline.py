"""DiMPipeline: the same images as sample.py and eval_ldm_discrete.py, upsampled sizes as the upsample configs,
diffusers' schedulers through the schedule mapping, and loading offline through diffusers' own loader."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

import eval_ldm_discrete as ev
import sample
from conftest import ROOT
from libs import load_config
from libs.pipeline import DiMPipeline, DiMScheduler
from libs.pipeline.convert import pipeline_from_config
from libs.sampling import SamplingSpec
from tiny_pipeline import (BATCH, SCALE, SEED, STEPS, write_latent_run, write_unconditional_run,
                           write_upsample_config)

pytestmark = pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    return write_latent_run(str(tmp_path_factory.mktemp('run')))


@pytest.fixture(scope='module')
def pipe(run):
    return DiMPipeline.from_pretrained(run['pipeline'])


def pngs(folder, names):
    return [np.asarray(Image.open(os.path.join(folder, name)).convert('RGB')) for name in names]


def arrays(images):
    return [np.asarray(im.convert('RGB')) for im in images]


def test_pipeline_sample_py_and_eval_make_the_same_images(run, pipe, tmp_path):
    n = 5
    labels = SamplingSpec.from_config(load_config(run['config'])).labels(range(n)).tolist()  # eval's random labels
    ev.evaluate(load_config(run['config']), run['nnet'], str(tmp_path / 'eval'), name='tiny_latent')
    evaluated = pngs(tmp_path / 'eval', [f'{i}.png' for i in range(n)])

    sample.main(['--config', run['config'], '--nnet_path', run['nnet'], '--classes', *map(str, labels),
                 '--n-per-class', '1', '--seed', str(SEED), '--steps', str(STEPS), '--scale', str(SCALE),
                 '--batch-size', str(BATCH), '--out', str(tmp_path / 'sample')])
    sampled = pngs(tmp_path / 'sample', [f'{i:04d}_class{k}.png' for i, k in enumerate(labels)])

    images = pipe(labels, guidance_scale=1 + SCALE, num_inference_steps=STEPS, batch_size=BATCH,
                  generator=torch.Generator().manual_seed(SEED)).images
    assert [im.size for im in images] == [(8, 8)] * n
    for a, b, c in zip(arrays(images), sampled, evaluated):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert len({a.tobytes() for a in sampled}) == n                      # five different images
    names = [pipe.id2label[k] for k in labels]                           # class names give the same images
    by_name = pipe(names, num_inference_steps=STEPS, batch_size=BATCH, generator=SEED).images
    assert all(np.array_equal(a, b) for a, b in zip(arrays(by_name), sampled))   # the config's guidance by default


def test_above_the_resolution_the_pipeline_samples_as_the_upsample_config(run, pipe, tmp_path):
    config = write_upsample_config(str(tmp_path), run)
    sample.main(['--config', config, '--nnet_path', run['nnet'], '--classes', '207', 'otter', '--n-per-class', '1',
                 '--seed', '3', '--out', str(tmp_path / 'sample')])
    expected = pngs(tmp_path / 'sample', ['0000_class207.png', '0001_class360.png'])
    images = pipe(['golden retriever', 360], guidance_scale=4.0, num_inference_steps=STEPS, height=16, width=16,
                  generator=3).images
    assert all(np.array_equal(a, b) for a, b in zip(arrays(images), expected))
    assert pipe.transformer.additional_embed.shape == (1, 2 + 4, 32) and pipe.transformer.skip_tune is None
    plain = pipe(['golden retriever'], guidance_scale=4.0, num_inference_steps=STEPS, generator=3).images
    assert plain[0].size == (8, 8)
    with pytest.raises(ValueError, match=r"equal multiples of the model's resolution 8 \(8, 16, ...; above it "
                                         r"upsample guidance\), got 12x12"):
        pipe([1], height=12)


def test_diffusers_schedulers_through_the_mapping(run, pipe):
    """DDIM with trailing spacing visits the official steps: through diffusers' scheduler (network at t + 1,
    guidance w = 1 + s) it gives the official 'ddim' sampler's images."""
    request = dict(class_labels=[1, 2, 3], guidance_scale=2.5, num_inference_steps=4, generator=0, output_type='pt')
    official = DiMPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=DiMScheduler(algorithm='ddim'),
                           conditional=True)(**request).images
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing='trailing', set_alpha_to_one=True,
                                     clip_sample=False)
    through_diffusers = DiMPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=ddim)(**request).images
    torch.testing.assert_close(through_diffusers, official, rtol=0, atol=1e-5)

    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[1][0].item()))
    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    try:
        images = DiMPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=dpm)(**request).images
    finally:
        hook.remove()
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    assert seen == [t + 1.0 for t in dpm.timesteps.tolist()]             # the network is told n = t + 1


def test_diffusers_loads_the_folder_offline_in_a_fresh_process(run, pipe):
    code = f'''
import json, torch
import libs.pipeline
from diffusers import DiffusionPipeline
from libs.pipeline import DiMPipeline
generic = DiffusionPipeline.from_pretrained({run['pipeline']!r})
bf16 = DiMPipeline.from_pretrained({run['pipeline']!r}, torch_dtype=torch.bfloat16)
images = generic([207, 'otter'], num_inference_steps=2, generator=0, output_type='np').images
low = bf16([207, 'otter'], num_inference_steps=2, generator=0, output_type='np').images
print(json.dumps(dict(cls=type(generic).__name__, dtype=str(bf16.transformer.dtype), vae=str(bf16.vae.dtype),
                      shape=list(images.shape), images=images.tolist(), diff=float(abs(images - low).max()))))
'''
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME='/nonexistent/hf-home')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['cls'] == 'DiMPipeline' and result['shape'] == [2, 8, 8, 3]
    assert result['dtype'] == result['vae'] == 'torch.bfloat16' and 0 < result['diff'] < 0.1    # bf16 rounding
    here = pipe([207, 'otter'], num_inference_steps=2, generator=0, output_type='np').images
    np.testing.assert_array_equal(np.array(result['images'], dtype=np.float32), here)


def test_an_unconditional_model_makes_num_images_as_sample_py(tmp_path):
    paths = write_unconditional_run(str(tmp_path))
    sample.main(['--config', paths['config'], '--nnet_path', paths['nnet'], '--n-per-class', '3', '--steps', '4',
                 '--seed', '2', '--out', str(tmp_path / 'sample')])
    pipe = pipeline_from_config(load_config(paths['config']), paths['nnet'])
    images = pipe(num_images=3, num_inference_steps=4, generator=2, batch_size=2).images
    expected = pngs(tmp_path / 'sample', ['0000.png', '0001.png', '0002.png'])
    assert all(np.array_equal(a, b) for a, b in zip(arrays(images), expected))
    with pytest.raises(ValueError, match='this model is unconditional: give num_images, not class_labels'):
        pipe([1])
    with pytest.raises(ValueError, match='and 1 for an unconditional model'):
        pipe(num_images=1, guidance_scale=2.0)


def test_requests_the_pipeline_refuses(run, pipe, tmp_path):
    with pytest.raises(ValueError, match=r"no class named 'golden retreiver'; closest names: 'golden retriever'"):
        pipe(['golden retreiver'])
    with pytest.raises(ValueError, match='give class_labels'):
        pipe()
    with pytest.raises(ValueError, match=r'guidance_scale=0.5: must be >= 1'):
        pipe([1], guidance_scale=0.5)
    with pytest.raises(TypeError, match='one torch.Generator or an int seed'):
        pipe([1], generator=[torch.Generator()])
    with pytest.raises(FileNotFoundError, match=f"pipeline folder not found: {tmp_path / 'nowhere'} has no "
                                                "model_index.json"):
        DiMPipeline.from_pretrained(str(tmp_path / 'nowhere'))
    os.rename(os.path.join(run['pipeline'], 'transformer', 'diffusion_pytorch_model.safetensors'), tmp_path / 'w')
    try:
        with pytest.raises(OSError, match='diffusion_pytorch_model'):
            DiMPipeline.from_pretrained(run['pipeline'])
    finally:
        os.rename(tmp_path / 'w', os.path.join(run['pipeline'], 'transformer', 'diffusion_pytorch_model.safetensors'))


def test_the_examples_of_the_getting_images_doc_run(run, tmp_path, monkeypatch):
    doc = (ROOT / 'docs' / 'getting-images.md').read_text()
    start = doc.index('## diffusers')
    blocks = re.findall(r"```python\n(.*?)```", doc[start:], re.S)[:2]
    os.symlink(run['pipeline'], tmp_path / 'dim-imagenet256')
    monkeypatch.chdir(tmp_path)
    scope = {}
    for block in blocks:                                 # the second one goes on with the first one's pipe
        exec(compile(block, 'getting-images.md', 'exec'), scope)
        assert [im.size for im in scope['images']] == [(8, 8)] * len(scope['images'])
    assert len(scope['images']) == 1 and type(scope['pipe'].scheduler).__name__ == 'DPMSolverMultistepScheduler'
