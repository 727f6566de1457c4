"""`compile_network(nnet, mode)`: torch.compile for a DiM, as train and eval use it (`config.compile`).

Modes (`config.compile`):
  'none'             eager, the network unchanged (default);
  'default'          torch.compile's default Inductor mode;
  'max-autotune'     Inductor also benchmarks GEMM / kernel variants at compile time (slower compile);
  'reduce-overhead'  'default' plus CUDA graphs (small batches on a GPU; CUDA only).
The whole network is one graph (`fullgraph=True`): a graph break is an error, not a silent slowdown. The scan
backend is chosen (and logged) before compiling and frozen into the graph: set DIM_SCAN_BACKEND before. The
mamba_ssm backend is a plain autograd.Function over a pybind call that Dynamo cannot trace, so with it the graph is
split at every scan (`fullgraph=False`, said in a WARNING). Each new input shape compiles once more (a new
resolution or batch size; the batch dimension becomes dynamic after the first change). Parameters and state_dict
are shared with the eager module: save `nnet` itself (or strip the `_orig_mod.` prefix of the compiled one);
`compile_in_place` (training) compiles the module's call in place, so names and state_dict do not change.
"""
import logging

import torch

from libs.scan import scan_backend

__all__ = ['COMPILE_MODES', 'check_compile_mode', 'compile_network', 'compile_in_place']

COMPILE_MODES = ('none', 'default', 'max-autotune', 'reduce-overhead')
log = logging.getLogger(__name__)


def check_compile_mode(mode):
    """`mode`, validated: one of COMPILE_MODES."""
    if not isinstance(mode, str) or mode not in COMPILE_MODES:
        raise ValueError(f"config.compile must be one of {', '.join(map(repr, COMPILE_MODES))}, got {mode!r}")
    return mode


def _device(nnet):
    param = next(nnet.parameters(), None)
    return param.device if param is not None else torch.device('cpu')


def _compile_kwargs(nnet, mode):
    """torch.compile's keyword arguments for `mode`, or None for 'none' (logged once per call)."""
    mode = check_compile_mode(mode)
    if mode == 'none':
        return None
    device = _device(nnet)
    if mode == 'reduce-overhead' and device.type != 'cuda':
        raise ValueError(f"config.compile='reduce-overhead' records CUDA graphs: it needs the network on a CUDA "
                         f"device, not {device}; use 'default'")
    backend = scan_backend(str(device))
    fullgraph = backend != 'mamba_ssm'
    if not fullgraph:
        log.warning("torch.compile with the mamba_ssm scan backend: mamba-ssm's kernel is not a torch op, the graph "
                    "breaks at every scan. DIM_SCAN_BACKEND=triton compiles as one graph")
    log.info('compiling the network: torch.compile mode %r, fullgraph=%s, scan backend %r, device %s',
             mode, fullgraph, backend, device)
    return dict(mode=None if mode == 'default' else mode, fullgraph=fullgraph)


def compile_network(nnet, mode):
    """`nnet` compiled with torch.compile `mode` (see the module docstring), or `nnet` itself for 'none'."""
    kwargs = _compile_kwargs(nnet, mode)
    return nnet if kwargs is None else torch.compile(nnet, **kwargs)


def compile_in_place(nnet, mode):
    """`nnet.compile(...)` for `mode` (training: parameter names and state_dict stay those of `nnet`); `nnet`."""
    kwargs = _compile_kwargs(nnet, mode)
    if kwargs is not None:
        nnet.compile(**kwargs)
    return nnet
