"""Loading network weights: released `nnet.pth` / `nnet_ema.pth` files (plain state dicts) into a DiM.

A positional table made for another token grid is bilinearly interpolated to the model's, as the
official loader does (docs/architecture.md §11). Every other mismatch is an error listing the keys. A file that
cannot be read raises libs.files.UnreadableFile naming it and what is wrong (empty, truncated, not a torch file).
"""
import os

import torch

from libs.files import load_torch_file

from .dim import interpolate_pos_table

__all__ = ['read_state_dict', 'weights_file', 'read_weights', 'strip_wrapper_prefixes', 'load_nnet_weights',
           'load_network']

_PREFIXES = ('module.', '_orig_mod.')   # DDP and torch.compile wrappers
SAFETENSORS_NAME = 'diffusion_pytorch_model.safetensors'   # diffusers' name for a model's weights


def read_state_dict(path):
    """A plain state dict from a `.pth` file, on CPU."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: pass the weights file inside it (e.g. {path}/nnet_ema.pth)")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"network weights not found: {path}. The released DiM checkpoints (nnet_ema.pth) are linked "
            "from https://github.com/tyshiwo1/DiM-DiffusionMamba#checkpoints; see README 'Assets'.")
    state = load_torch_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a plain state_dict of tensors (as nnet.pth / nnet_ema.pth are)")
    return state


def weights_file(path):
    """The file holding the weights of `path`: `path` itself, or the safetensors file of a diffusers folder (a
    pipeline folder of scripts/convert_to_diffusers.py: transformer/<SAFETENSORS_NAME>; a model folder:
    <SAFETENSORS_NAME>)."""
    if not os.path.isdir(path):
        return path
    for candidate in (os.path.join(path, 'transformer', SAFETENSORS_NAME), os.path.join(path, SAFETENSORS_NAME)):
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(f"{path} is a folder: pass the weights file inside it (e.g. {path}/nnet_ema.pth), or a diffusers "
                     f"folder with transformer/{SAFETENSORS_NAME} (made by scripts/convert_to_diffusers.py)")


def read_weights(path):
    """The state dict of network weights at `path`, on CPU: a `.pth` file (`read_state_dict`), a `.safetensors` file
    or a diffusers folder (`weights_file`), with the same keys."""
    path = weights_file(path)
    if not (path.endswith('.safetensors') and os.path.isfile(path)):
        return read_state_dict(path)        # .pth files, and the error naming a missing file and its source
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def strip_wrapper_prefixes(state):
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_nnet_weights(model, source, name=None):
    """Load `source` (a path for `read_weights`, or a state dict) into `model` strictly; returns the model.

    Missing, unexpected or mis-shaped keys raise a RuntimeError that lists them (and `name`, the source's name).
    """
    name = name or (source if isinstance(source, str) else '<state dict>')
    state = strip_wrapper_prefixes(read_weights(source) if isinstance(source, str) else source)
    own = model.state_dict()
    table = state.get('additional_embed')
    if table is not None and table.shape != own['additional_embed'].shape and table.shape[-1] == own['additional_embed'].shape[-1]:
        side = int(round((own['additional_embed'].shape[1] - 2) ** 0.5))
        state['additional_embed'] = interpolate_pos_table(table.float(), side, side)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes}")
    if problems:
        raise RuntimeError(f"cannot load {name} into this network (wrong config?):\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


def load_network(config, nnet_path):
    """The DiM of `config` (config.nnet) with the weights of `nnet_path` loaded strictly, in eval mode, without
    gradients; on the CPU. config.nnet.pretrained_path is not read (the weights come from `nnet_path`)."""
    from .build import build_nnet
    state = read_weights(nnet_path)          # a missing file fails before the (maybe large) network is built
    kwargs = {k: v for k, v in config.nnet.to_dict().items() if k != 'pretrained_path'}
    return load_nnet_weights(build_nnet(**kwargs), state, name=nnet_path).eval().requires_grad_(False)
