"""What is in a network weight file (nnet.pth / nnet_ema.pth): the configs it loads into, size, EMA or not.

    python scripts/inspect_checkpoint.py workdir/imagenet256_H_DiM/default/ckpts/425000.ckpt/nnet_ema.pth
    python scripts/inspect_checkpoint.py nnet_ema.pth --config configs/imagenet512_H_DiM_ft.py

Each config's network is built on the meta device (no memory) and its state dict keys and shapes are compared with
the file's. A positional table made for another token grid still matches ("interpolated"), as the loader resizes
it (this is how the 512 weights run the 1024/1536 upsample configs). EMA: the file name says so, and a sibling
nnet.pth / nnet_ema.pth, if present, is compared tensor by tensor (EMA weights differ from the online ones).
"""
from __future__ import annotations

import argparse
import glob
import math
import os

import torch

from libs import get_nnet
from libs.config import config_name, load_config
from libs.model.weights import strip_wrapper_prefixes, read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_EXTRA = 2  # time and class rows of the positional table


def table_grid(state):
    """Side of the square token grid of the positional table `additional_embed` (1, 2 + g*g, D), or None."""
    table = state.get('additional_embed')
    if table is None or table.dim() != 3:
        return None
    g = math.isqrt(table.shape[1] - N_EXTRA)
    return g if g * g == table.shape[1] - N_EXTRA else None


def compare_with_config(state, config_path):
    """{'match': 'exact' | 'interpolated' | None, 'missing', 'unexpected', 'mismatched', 'n_params'} for a config."""
    config = load_config(config_path)
    kwargs = {k: v for k, v in config.nnet.to_dict().items() if k != 'pretrained_path'}
    with torch.device('meta'):
        shapes = {k: tuple(v.shape) for k, v in get_nnet(**kwargs).state_dict().items()}
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs config {shapes[k]}"
                  for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    table, own = state.get('additional_embed'), shapes.get('additional_embed')
    interpolated = table is not None and own is not None and tuple(table.shape) != own and table.shape[-1] == own[-1]
    if interpolated:
        mismatched = [m for m in mismatched if not m.startswith('additional_embed:')]
    match = None if (missing or unexpected or mismatched) else 'interpolated' if interpolated else 'exact'
    return dict(match=match, missing=missing, unexpected=unexpected, mismatched=mismatched,
                n_params=sum(math.prod(s) for s in shapes.values()))


def ema_evidence(path, state):
    """{'by_name', 'sibling', 'sibling_differs', 'max_abs_diff'}: is this the EMA file of a checkpoint?"""
    name = os.path.basename(path)
    other = {'nnet_ema.pth': 'nnet.pth', 'nnet.pth': 'nnet_ema.pth'}.get(name)
    sibling = os.path.join(os.path.dirname(path), other) if other else None
    out = dict(by_name='ema' in name.lower(), sibling=None, sibling_differs=None, max_abs_diff=None)
    if sibling and os.path.isfile(sibling):
        theirs = strip_wrapper_prefixes(read_state_dict(sibling))
        diffs = [(state[k].float() - theirs[k].float()).abs().max().item() if state[k].numel() else 0.0
                 for k in state if k in theirs and theirs[k].shape == state[k].shape]
        same_layout = len(diffs) == len(state) == len(theirs)
        out.update(sibling=sibling, max_abs_diff=max(diffs, default=0.0),
                   sibling_differs=not same_layout or max(diffs, default=0.0) > 0)
    return out


def inspect(path, config_paths=None):
    """Everything the report prints, as a dict."""
    state = strip_wrapper_prefixes(read_state_dict(path))
    config_paths = config_paths or sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
    return dict(
        path=path, file_bytes=os.path.getsize(path), n_tensors=len(state),
        n_params=sum(v.numel() for v in state.values()),
        dtypes=sorted({str(v.dtype).replace('torch.', '') for v in state.values()}),
        table_grid=table_grid(state), ema=ema_evidence(path, state),
        configs={config_name(c): compare_with_config(state, c) for c in config_paths})


def report(info):
    """Human-readable lines of `inspect`'s dict."""
    lines = [f"{info['path']}: {info['file_bytes'] / 2 ** 20:.1f} MiB, {info['n_tensors']} tensors, "
             f"{info['n_params']:,} parameters ({', '.join(info['dtypes'])})"]
    g = info['table_grid']
    lines.append(f"positional table: {g}x{g} token grid" if g else "positional table: none (not a DiM state dict?)")
    ema = info['ema']
    text = 'EMA by its file name' if ema['by_name'] else 'not named as EMA'
    if ema['sibling']:
        text += (f"; differs from {ema['sibling']} (max |diff| {ema['max_abs_diff']:.3g})" if ema['sibling_differs']
                 else f"; identical to {ema['sibling']}")
    lines.append(text)
    lines.append('configs:')
    for name, c in info['configs'].items():
        if c['match'] == 'exact':
            verdict = 'match'
        elif c['match'] == 'interpolated':
            verdict = 'match (positional table interpolated to the config\'s grid at load)'
        else:
            parts = [f"{len(c[k])} {k}" for k in ('missing', 'unexpected', 'mismatched') if c[k]]
            first = (c['mismatched'] or c['missing'] or c['unexpected'])[0]
            verdict = f"no match: {', '.join(parts)} keys (e.g. {first})"
        lines.append(f"  {name:34s} {verdict}")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('path', help='nnet.pth / nnet_ema.pth (a plain state dict)')
    parser.add_argument('--config', action='append', default=None,
                        help='config file to compare with (repeatable; default: every configs/*.py)')
    args = parser.parse_args(argv)
    info = inspect(args.path, args.config)
    print(report(info))
    return info


if __name__ == '__main__':
    main()
