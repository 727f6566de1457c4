"""Config files (`configs/*.py`, ml_collections `get_config()` modules) and what every script reads from them.

`load_config(path)` loads one; `check_top_level_keys(config)` refuses keys no script reads; `is_conditional` and
`num_classes` are the one place that says whether a run is class-conditional and how many classes it has.
"""
import importlib.util
import os

__all__ = ['ConfigError', 'load_config', 'config_name', 'check_top_level_keys', 'is_conditional', 'num_classes',
           'TOP_LEVEL_KEYS']


class ConfigError(ValueError):
    """A config value the run cannot work with; the message names the key, its value and what is expected."""


# Keys of a config that the train, eval and sample scripts read (sections are checked by their readers:
# config.train by libs.training.config, config.sample by libs.sampling, config.nnet by libs.model.build,
# config.dataset by libs.data.datasets, config.optimizer / lr_scheduler by libs.training.optimizer).
TOP_LEVEL_KEYS = ('seed', 'compile', 'z_shape', 'gradient_accumulation_steps', 'max_grad_norm',
                  'gradient_checkpointing', 'recompute', 'train', 'optimizer', 'lr_scheduler', 'nnet', 'dataset', 'sample',
                  'autoencoder')
AUTOENCODER_KEYS = ('pretrained_path',)
DEFAULT_NUM_CLASSES = 1000          # config.nnet.num_embeds_ada_norm when unset (libs.model.build's default)


def config_name(path):
    """'configs/imagenet256_H_DiM.py' -> 'imagenet256_H_DiM'."""
    return os.path.splitext(os.path.basename(path))[0]


def load_config(path):
    """The ConfigDict that `get_config()` of the file at `path` returns."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f'dim_config_{config_name(path)}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ValueError(f"{path} defines no get_config()")
    return module.get_config()


def check_top_level_keys(config):
    """Raise ConfigError naming every top-level or config.autoencoder key that nothing reads."""
    problems = [f"config.{k}" for k in sorted(set(config.keys()) - set(TOP_LEVEL_KEYS))]
    if config.get('autoencoder'):
        problems += [f"config.autoencoder.{k}" for k in sorted(set(config.autoencoder.keys()) - set(AUTOENCODER_KEYS))]
    if problems:
        raise ConfigError(f"unknown config key(s) {', '.join(problems)}: nothing reads them (top-level keys: "
                          f"{', '.join(TOP_LEVEL_KEYS)}; config.autoencoder: {', '.join(AUTOENCODER_KEYS)})")


def is_conditional(config):
    """Whether the run is class-conditional: config.train.mode 'cond' (the default of configs without a train
    section, such as the evaluation-only upsample configs) or 'uncond'."""
    mode = config.get('train', {}).get('mode', 'cond')
    if mode not in ('cond', 'uncond'):
        raise ConfigError(f"config.train.mode={mode!r}; expected 'cond' or 'uncond'")
    return mode == 'cond'


def num_classes(config):
    """K, the network's class count (config.nnet.num_embeds_ada_norm); the null class of guidance is K."""
    return int(config.nnet.get('num_embeds_ada_norm', DEFAULT_NUM_CLASSES))
