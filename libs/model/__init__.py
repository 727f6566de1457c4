"""The DiM network: `get_nnet(**config.nnet)` builds it (build.py), `load_network(config, path)` loads released
weights into it (weights.py). The backbone is dim.py, its Mamba mixer mixer.py, the token orders scan_order.py."""
from .build import PRESETS, build_nnet, get_nnet
from .dim import DiM

__all__ = ['PRESETS', 'DiM', 'build_nnet', 'get_nnet']
