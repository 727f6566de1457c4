"""DiM: Diffusion Mamba. `get_nnet(**config.nnet)` builds the backbone."""
from .model.build import get_nnet

__all__ = ['get_nnet']
