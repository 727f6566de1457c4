"""Bytes saved for backward per token per layer, and the per-config training-memory estimate.

    python benchmarks/activation_memory.py [--widths 96 512 1024 1536] [--peak] [--json PATH]

Saved bytes are measured on a 3-layer DiM of each width at L = 366 tokens (16x16 grid), the distinct
storages autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks, parameters excluded) at batch 3 minus
batch 1, divided by 2 * L * 3; in fp32 and under CPU bf16 autocast; next to the design figure of libs/model/memory_estimate.py
for the same 3-layer model and the per-block figures. --peak also measures the peak-memory slope over batch (max RSS of
fresh processes) at the largest width, which calibrates the working-set term of the estimate. Then the table of every
training config at its official per-GPU batch (train.batch_size / 8; the digits demo: one process).
"""
import argparse
import glob
import json
import os
import resource
import subprocess
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from libs import get_nnet                                    # noqa: E402
from libs.config import config_name, load_config      # noqa: E402
from libs.model.memory_estimate import (GPU_BYTES, OFFICIAL_GPUS, SavedBytes, block_bytes_per_sample,  # noqa: E402
                                  block_bytes_per_token, config_memory_estimate, head_bytes_per_image_token)

GRID, LAYERS = 16, 3                     # L = 2 + 3 + 19 * 19 = 366 tokens, as in the issue
TOKENS = 2 + 3 + (GRID + 3) ** 2


def small_dim(width, layers=LAYERS):
    torch.manual_seed(0)
    return get_nnet('Mamba_DiT_H_2', attention_head_dim=width, num_layers=layers, sample_size=2 * GRID).train()


def _inputs(batch):
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 4, 2 * GRID, 2 * GRID, generator=g), 1000 * torch.rand(batch, generator=g),
            torch.randint(0, 1000, (batch,), generator=g))


def saved_per_token_per_layer(model, autocast):
    """Measured bytes saved for backward per token per layer (batch 3 minus batch 1)."""
    saved = []
    for batch in (1, 3):
        with SavedBytes(model) as meter, torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = model(*_inputs(batch))
        saved.append(meter.bytes)
        del out
    return (saved[1] - saved[0]) / (2 * TOKENS * len(model.transformer_blocks))


def design_per_token_per_layer(model, operand_bytes):
    """The same figure from libs/model/memory_estimate.py (blocks, head on the image tokens, per-sample terms)."""
    D, blocks = model.width, model.transformer_blocks
    per_token = sum(block_bytes_per_token(D, 2, operand_bytes, b.skip_linear is not None) for b in blocks)
    per_sample = len(blocks) * block_bytes_per_sample(D) + GRID ** 2 * head_bytes_per_image_token(D, operand_bytes)
    return (per_token + per_sample / TOKENS) / len(blocks)


def peak_child(width, batch, checkpointing):
    """Max RSS growth (bytes) of one training step at `batch` over a batch-1 step, in this process."""
    model = small_dim(width)
    model.gradient_checkpointing = checkpointing

    def step(b):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = model(*_inputs(b)).square().mean()
        loss.backward()
    step(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(batch)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024


def peak_per_sample(width, checkpointing):
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '0'}
    peaks = []
    for batch in (4, 7):
        command = [sys.executable, __file__, '--peak-child', str(width), str(batch), str(int(checkpointing))]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        peaks.append(int(out.split()[-1]))
    return (peaks[1] - peaks[0]) / 3


def config_rows():
    rows = []
    for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
        config = load_config(path)
        if 'train' not in config:
            continue                                          # sampling-only configs
        gpus = 1 if config.dataset.name == 'digits' else OFFICIAL_GPUS
        est = config_memory_estimate(config, gpus=gpus)
        rows.append(dict(config=config_name(path), gpus=gpus,
                         gradient_checkpointing=bool(config.gradient_checkpointing), **est))
    return rows


def print_config_table(rows):
    gb = lambda b: f'{b / 1e9:.1f}'
    print(f'\nPer-GPU training memory estimate (bf16 autocast; fits = within {0.9 * GPU_BYTES / 1e9:.0f} GB of '
          f'{GPU_BYTES / 1e9:.0f} GB):')
    print('| config | D x layers | tokens | batch/GPU | B/token/layer | activations GB | + states DDP / sharded GB '
          '| checkpointed activations GB | gradient_checkpointing |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        where = f"{r['gpus']} GPUs" if r['gpus'] > 1 else '1 process'
        print(f"| {r['config']} | {r['width']} x {r['depth']} | {r['tokens']} | {r['batch_per_gpu']} ({where}) "
              f"| {r['bytes_per_token_per_layer']} | {gb(r['activations'])} "
              f"| {gb(r['activations'] + r['state_replicated'])} / {gb(r['activations'] + r['state_sharded'])} "
              f"| {gb(r['activations_checkpointed'])} | {'on' if r['gradient_checkpointing'] else 'off'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--widths', type=int, nargs='+', default=[96, 512, 1024, 1536])
    parser.add_argument('--peak', action='store_true', help='also measure the peak-memory slope at the largest width')
    parser.add_argument('--json', help='write the figures to this file')
    parser.add_argument('--peak-child', type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        print(peak_child(args.peak_child[0], args.peak_child[1], bool(args.peak_child[2])))
        return

    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; {LAYERS}-layer DiM, L = {TOKENS} tokens')
    print('bytes saved for backward per token per layer, measured (design):')
    results = dict(widths={}, configs=config_rows())
    for width in args.widths:
        model = small_dim(width)
        entry = {}
        for name, autocast, e in (('fp32', False, 4), ('bf16', True, 2)):
            entry[name] = dict(measured=saved_per_token_per_layer(model, autocast),
                               design=design_per_token_per_layer(model, e),
                               block=block_bytes_per_token(width, 2, e),
                               skip_block=block_bytes_per_token(width, 2, e, skip=True))
        results['widths'][width] = entry
        print(f"  D={width:5d}: " + '; '.join(
            f"{k} {v['measured'] / 1e3:7.1f} KB ({v['design'] / 1e3:.1f}; block {v['block'] / 1e3:.1f}, "
            f"skip block {v['skip_block'] / 1e3:.1f})" for k, v in entry.items()))
    if args.peak:
        width = max(args.widths)
        model = small_dim(width)
        saved = saved_per_token_per_layer(model, True) * LAYERS * TOKENS
        di_tensor = 4 * 2 * width * TOKENS
        for ckpt in (False, True):
            peak = peak_per_sample(width, ckpt)
            kept = 4 * width * TOKENS * LAYERS if ckpt else saved
            results[f'peak_per_sample_checkpointing_{ckpt}'] = peak
            print(f'  peak per sample, D={width}, bf16, checkpointing {ckpt}: {peak / 1e6:.1f} MB; working set beyond '
                  f'the saved bytes {(peak - kept) / di_tensor:.1f} fp32 tensors of width Di per token')
    print_config_table(results['configs'])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
