"""DiM: Diffusion Mamba. What a script of your own imports:

    from libs import load_config, load_network, SamplingSpec, sample_images
    config = load_config('configs/digits_DiM_tiny.py')
    nnet = load_network(config, 'path/to/nnet_ema.pth')          # the config's network, weights loaded strictly
    images = sample_images(nnet, SamplingSpec.from_config(config), labels=[3, 3, 7])

`get_nnet(**config.nnet)` builds a freshly initialised network (libs.model), `selective_scan` is the selective scan
on every backend (libs.scan), `sample_batches` the generate loop the scripts use (libs.sampling).
"""
from .config import load_config
from .model import get_nnet
from .model.weights import load_network
from .sampling import SamplingSpec, sample_batches, sample_images
from .scan import selective_scan

__all__ = ['load_config', 'get_nnet', 'load_network', 'SamplingSpec', 'sample_batches', 'sample_images',
           'selective_scan']
