"""The DiM backbone as a diffusers model: `save_pretrained(folder)` writes config.json (the official keyword
arguments of config.nnet) and the weights as safetensors; `from_pretrained(folder)` rebuilds it.

`DiMTransformer2DModel` is a `DiM` (libs/model/dim.py) that is also a diffusers `ModelMixin`: it builds the very
same modules, so its state_dict keys are the official ones and a released `nnet_ema.pth` loads into it strictly.
`DiM` itself stays a plain `nn.Module`, which the training, evaluation and tests use.
"""
from diffusers import ConfigMixin, ModelMixin  # diffusers' loader finds the load method through these names
from diffusers.configuration_utils import register_to_config

from libs.model.build import dim_arguments, official_arguments
from libs.model.dim import DiM

__all__ = ['DiMTransformer2DModel']


class DiMTransformer2DModel(DiM, ModelMixin, ConfigMixin):
    """eps = model(x (B, C, H, W), timesteps (B,) on the 0-1000 scale, y (B,) in [0, K]) -> (B, C, H, W), as `DiM`.

    The constructor takes the official keyword arguments of config.nnet (libs/model/build.py); the preset sizes
    (num_attention_heads, attention_head_dim, num_layers, patch_size) come from `name` when None.
    `from_nnet_config(config.nnet)` registers every argument, so config.json describes the network in full.
    """
    config_name = 'config.json'

    @register_to_config
    def __init__(self, name='Mamba_DiT_H_2', num_attention_heads=None, attention_head_dim=None, num_layers=None,
                 patch_size=None, in_channels=4, out_channels=None, num_embeds_ada_norm=1000, sample_size=32,
                 num_patches=None, mamba_d_state=16, mamba_d_conv=3, mamba_expand=2, encoder_start_blk_id=1,
                 pad_token_schedules=('dec_split', 'lateral'), multi_times=1, is_skip_tune=False,
                 skip_tune_param=(0.82, 1.0), skip_tune_schedule='official'):
        given = {k: v for k, v in locals().items() if k != 'self' and v is not None}   # the arguments only
        DiM.__init__(self, **dim_arguments(**given))

    @classmethod
    def from_nnet_config(cls, nnet_config):
        """A freshly initialised model of config.nnet (pretrained_path is not read: load weights yourself)."""
        kwargs = {k: v for k, v in dict(nnet_config).items() if k != 'pretrained_path'}
        official = official_arguments(**kwargs)
        for key in ('pad_token_schedules', 'skip_tune_param', 'num_patches'):   # JSON-friendly lists
            if official.get(key) is not None:
                official[key] = list(official[key])
        return cls(**official)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' `from_pretrained`, made strict: a missing, unexpected or mis-shaped weight is an error naming
        it (diffusers only logs a warning and leaves such weights uninitialised)."""
        return_info = kwargs.pop('output_loading_info', False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {k: v for k, v in info.items() if k != 'error_msgs' and v}
        if problems:
            source = args[0] if args else kwargs.get('pretrained_model_name_or_path')
            raise RuntimeError(f"cannot load {source} into {cls.__name__}: {problems}")
        return (model, info) if return_info else model

