"""Load a `configs/*.py` file (an ml_collections `get_config()` module) by path."""
import importlib.util
import os

__all__ = ['load_config', 'config_name']


def config_name(path):
    """'configs/imagenet256_H_DiM.py' -> 'imagenet256_H_DiM'."""
    return os.path.splitext(os.path.basename(path))[0]


def load_config(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f'dim_config_{config_name(path)}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ValueError(f"{path} defines no get_config()")
    return module.get_config()
