"""DiM vs an attention backbone of the same width, depth and patch size: time per image vs token count.

    python benchmarks/model.py [--width 256] [--depth 9] [--grids 16 32 64 96] [--out benchmarks/results]

For each token grid g (latent 2g x 2g, patch 2) it times the forward pass (sampling) and forward+backward
(training) of DiM and of a ViT/DiT-style stack of timm attention blocks (PyTorch's fused scaled-dot-product
attention, MLP ratio 4), in the same process, and writes model.json and model.png (log-log time vs tokens).
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from libs import get_nnet                      # noqa: E402
from libs.scan import scan_backend   # noqa: E402


class AttentionBaseline(nn.Module):
    """Patch embedding, `depth` timm ViT blocks (attention + MLP), linear head; same width and patch size."""

    def __init__(self, width, depth, in_channels=4, patch_size=2, head_dim=64):
        super().__init__()
        from timm.models.vision_transformer import Block
        self.p, self.c = patch_size, in_channels
        self.embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList([Block(width, max(1, width // head_dim), mlp_ratio=4.0, qkv_bias=True)
                                     for _ in range(depth)])
        self.head = nn.Linear(width, patch_size * patch_size * in_channels)

    def forward(self, x, t, y=None):
        B, C, H, W = x.shape
        h = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        out = self.head(h).view(B, H // self.p, W // self.p, self.p, self.p, C)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def _time(fn, repeats, budget_s):
    fn()                                             # warm-up (index tables, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if sum(times) > budget_s:
            break
    return sorted(times)[len(times) // 2]


def measure(model, grid, batch, train, repeats, budget_s):
    x = torch.randn(batch, 4, 2 * grid, 2 * grid)
    t = torch.full((batch,), 500.0)
    y = torch.zeros(batch, dtype=torch.long)
    if train:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(x, t, y).square().mean().backward()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(x, t, y)
    return _time(step, repeats, budget_s) / batch


def crossover(rows, key):
    """Smallest token count at which DiM is faster than attention for `key` ('fwd' or 'fwd_bwd'), or None."""
    for r in rows:
        if r[f'dim_{key}_s'] is not None and r[f'attn_{key}_s'] is not None and r[f'dim_{key}_s'] < r[f'attn_{key}_s']:
            return r['tokens']
    return None


def plot(rows, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, style in (('fwd', '-'), ('fwd_bwd', '--')):
        for model, color in (('dim', 'C0'), ('attn', 'C3')):
            pts = [(r['tokens'], r[f'{model}_{key}_s']) for r in rows if r[f'{model}_{key}_s'] is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=color, marker='o',
                        label=f"{'DiM' if model == 'dim' else 'attention'} {key.replace('_', '+')}")
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('image tokens')
    ax.set_ylabel('seconds per image')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--width', type=int, default=256)
    parser.add_argument('--depth', type=int, default=9)
    parser.add_argument('--grids', type=int, nargs='+', default=[16, 32, 64, 96])
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--budget', type=float, default=60.0, help='seconds of timing per measurement at most')
    parser.add_argument('--skip-train-above', type=int, default=64, help='no fwd+bwd for grids above this')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim = get_nnet('Mamba_DiT_S_2', attention_head_dim=args.width, num_layers=args.depth, in_channels=4,
                   num_embeds_ada_norm=1000)
    attn = AttentionBaseline(args.width, args.depth)
    params = {'dim': sum(p.numel() for p in dim.parameters()), 'attn': sum(p.numel() for p in attn.parameters())}
    rows = []
    for g in args.grids:
        row = {'grid': g, 'tokens': g * g}
        for name, model in (('dim', dim), ('attn', attn)):
            row[f'{name}_fwd_s'] = measure(model, g, args.batch, False, args.repeats, args.budget)
            train = g <= args.skip_train_above
            row[f'{name}_fwd_bwd_s'] = measure(model, g, args.batch, True, args.repeats, args.budget) if train else None
        rows.append(row)
        fmt = lambda v: '   -   ' if v is None else f'{v:7.3f}'
        print(f"{g:3d}^2 = {g * g:5d} tokens | fwd s/img: DiM {fmt(row['dim_fwd_s'])} attn {fmt(row['attn_fwd_s'])}"
              f" | fwd+bwd s/img: DiM {fmt(row['dim_fwd_bwd_s'])} attn {fmt(row['attn_fwd_bwd_s'])}", flush=True)
    result = {
        'device': platform.processor() or platform.machine(), 'threads': args.threads, 'torch': torch.__version__,
        'scan_backend': scan_backend('cpu'), 'width': args.width, 'depth': args.depth, 'patch_size': 2,
        'batch': args.batch, 'parameters': params, 'rows': rows,
        'crossover_tokens': {'fwd': crossover(rows, 'fwd'), 'fwd_bwd': crossover(rows, 'fwd_bwd')},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'model.json'), 'w') as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.join(args.out, 'model.png'),
         f"DiM vs attention, width {args.width}, depth {args.depth}, patch 2, CPU {args.threads} thread(s)")
    print(f"DiM cheaper than attention from {result['crossover_tokens']} tokens; "
          f"wrote {os.path.join(args.out, 'model.json')} and model.png")
    return result


if __name__ == '__main__':
    main()
