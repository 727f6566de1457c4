"""Released checkpoints <-> pipeline folders (scripts/convert_to_diffusers.py).

`pipeline_from_config(config, nnet_path)` builds a DiMPipeline from a config, its network weights (`.pth`,
`.safetensors` or a diffusers folder) and the config's autoencoder (an LDM `.pth` or a diffusers folder);
`save_pretrained` of the result writes the folder. `state_dict_of_folder` reads a folder's backbone weights back
as the official state dict (nnet_ema.pth).
"""
import os

import torch

from libs.config import is_conditional
from libs.data.autoencoder import load_autoencoder
from libs.data.class_names import class_names
from libs.files import FileChecks
from libs.model.weights import load_nnet_weights, read_weights, weights_file
from libs.pipeline.pipeline import DiMPipeline
from libs.pipeline.scheduler import BASE_ALGORITHMS, DiMScheduler, guidance_scale_of
from libs.pipeline.transformer import DiMTransformer2DModel
from libs.sampling import SamplingSpec

__all__ = ['pipeline_from_config', 'scheduler_of', 'state_dict_of_folder']


def scheduler_of(config):
    """The DiMScheduler of config.sample's sampler; above the model's resolution it samples as the upsample
    configs (its defaults are theirs)."""
    algorithm = config.sample.algorithm
    if algorithm == 'dpm_solver_upsample_g':
        raise ValueError("an upsample config samples the weights of another config above their resolution: convert "
                         "the 512 weights with configs/imagenet512_H_DiM_ft.py; the pipeline makes 1024 / 1536 px "
                         "images with height=1024 / 1536, as these configs do")
    if algorithm not in BASE_ALGORITHMS:
        raise ValueError(f"config.sample.algorithm={algorithm!r} has no DiMScheduler counterpart")
    return DiMScheduler(algorithm=algorithm)


def pipeline_from_config(config, nnet_path, autoencoder_path=None):
    """DiMPipeline of `config` on the CPU, fp32: the network of config.nnet with the weights of `nnet_path` (loaded
    strictly, the positional table resized as for the scripts), the autoencoder of `autoencoder_path` or
    config.autoencoder.pretrained_path (none for a pixel-space config), the class names, and the config's sampler,
    steps and guidance as the pipeline's defaults."""
    spec = SamplingSpec.from_config(config)
    if autoencoder_path and not config.get('autoencoder'):
        raise ValueError(f"{config.dataset.name!r} is a pixel-space config (no config.autoencoder): "
                         f"it takes no autoencoder, got {autoencoder_path}")
    load = FileChecks()                           # every missing file named at once, before anything is built
    state = load(read_weights, nnet_path)
    autoencoder = None
    if config.get('autoencoder'):
        autoencoder = load(load_autoencoder, autoencoder_path or config.autoencoder.pretrained_path, device='cpu')
    load.raise_if_missing()
    transformer = load_nnet_weights(DiMTransformer2DModel.from_nnet_config(config.nnet), state, name=nnet_path)
    vae = None
    if autoencoder is not None:
        vae = autoencoder.vae
        vae.register_to_config(scaling_factor=autoencoder.scale_factor)     # the latent scale DiM was trained on
    names = class_names(config, nnet_path)
    return DiMPipeline(transformer=transformer.eval(), scheduler=scheduler_of(config), vae=vae,
                       id2label=None if names is None else dict(enumerate(names)),
                       conditional=is_conditional(config), guidance_scale=guidance_scale_of(spec.scale),
                       num_inference_steps=spec.sample_steps)


def state_dict_of_folder(folder):
    """The backbone weights of a pipeline (or model) folder as the official nnet_ema.pth: the same keys in the same
    order (the network's, which its config.json rebuilds; safetensors files keep keys sorted)."""
    state = read_weights(folder)
    model_folder = os.path.dirname(weights_file(folder))
    with torch.device('meta'):
        model = DiMTransformer2DModel.from_config(DiMTransformer2DModel.load_config(model_folder))
    order = list(model.state_dict())
    if sorted(order) != sorted(state):
        raise ValueError(f"{weights_file(folder)} does not hold the weights its config.json describes: missing "
                         f"{sorted(set(order) - set(state))}, unexpected {sorted(set(state) - set(order))}")
    return {k: state[k] for k in order}
