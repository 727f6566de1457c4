"""DiM vs an attention backbone of the same width, depth and patch size: time per image vs token count.

    python benchmarks/model.py [--width 256] [--depth 9] [--grids 16 32 64 96] [--compile default]
                               [--variants dim dim_compiled dim_gemm_only attn attn_compiled] [--out benchmarks/results]

For each token grid g (latent 2g x 2g, patch 2) it times the forward pass (sampling) and forward+backward
(training), in the same process, of:
  dim            DiM, eager;
  dim_compiled   DiM through libs/model/compile.py (`compile_network`, one graph per grid);
  dim_gemm_only  the same DiM's GEMMs alone, same weights and shapes (patch embedding, per block the skip
                 projection, in_proj, x_proj, dt_proj, out_proj, then the output projection): no scan, no norms,
                 no conv, no elementwise work, no re-ordering (the per-sample conditioning GEMMs, batch rows only,
                 are left out). DiM's time / this time is its overhead over its GEMMs;
  attn           a ViT/DiT-style stack of timm attention blocks (PyTorch's fused scaled-dot-product attention,
                 MLP ratio 4), eager;
  attn_compiled  the same, torch.compile'd with the same mode.
Each time is the best of --repeats rounds that call every variant once in turn (a change of load on a shared
machine hits all of them alike). Writes model.json and model.png (log-log time vs tokens).
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from libs import get_nnet                                  # noqa: E402
from libs.model.compile import COMPILE_MODES, compile_network    # noqa: E402
from libs.model.dim import N_EXTRA                               # noqa: E402
from libs.scan import scan_backend                         # noqa: E402

VARIANTS = ('dim', 'dim_compiled', 'dim_gemm_only', 'attn', 'attn_compiled')


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


class GemmOnly(nn.Module):
    """The GEMMs of `dim`'s forward with its weights and shapes, chained through views: (x, t, y) -> the tuple of
    every GEMM output nothing else consumes (so that a backward from all of them reaches every weight).

    Per block: skip_linear (on a (B, L, 2D) input kept from the last call), in_proj, x_proj on the x half, dt_proj
    on the dt rank, out_proj on the x half (the scan's output shape). The sequence is DiM's: extras, separators and
    the padded grid (L = 2 + P + (h+P)(w+P)).
    """

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self._inputs = {}

    def _buffers_for(self, B, L, dtype):
        key = (B, L, dtype)
        if key not in self._inputs:
            g = torch.Generator().manual_seed(0)
            D = self.dim.width
            self._inputs = {key: (torch.randn(B, L, D, generator=g, dtype=dtype),
                                  torch.randn(B, L, 2 * D, generator=g, dtype=dtype))}
        return self._inputs[key]

    def forward(self, x, t, y=None):
        dim, B = self.dim, x.shape[0]
        h, w = x.shape[2] // dim.patch_size, x.shape[3] // dim.patch_size
        L = N_EXTRA + dim.pad_len + (h + dim.pad_len) * (w + dim.pad_len)
        image = dim.pos_embed(x)                                          # the patch-embedding GEMM
        u, cat_input = self._buffers_for(B, L, image.dtype)
        loose = [image]
        for block in dim.transformer_blocks:
            if isinstance(block.skip_linear, nn.Linear):
                u = block.skip_linear(cat_input)
            elif block.skip_linear is not None:                         # two projections, their sum dropped
                loose.append(block.skip_linear[0](u))
                u = block.skip_linear[1](u)
            mixer = block.attn1
            xz = mixer.in_proj(u)
            xs = xz[..., :mixer.d_inner]
            dt = mixer.x_proj(xs)[..., :mixer.dt_rank]
            loose.append(F.linear(dt, mixer.dt_proj.weight))
            u = mixer.out_proj(xs)
        return (dim.proj_out_2(u[:, :h * w]), *loose)


def make_step(model, module, grid, batch, train):
    """One forward (no grad) or forward + backward of `model` on a fresh batch; `module` holds its parameters."""
    x = torch.randn(batch, 4, 2 * grid, 2 * grid)
    t = torch.full((batch,), 500.0)
    y = torch.zeros(batch, dtype=torch.long)
    grads = []

    def step():
        module.train(train)
        if not train:
            with torch.no_grad():
                model(x, t, y)
            return
        module.zero_grad(set_to_none=True)
        out = model(x, t, y)
        if isinstance(out, tuple):                                      # GemmOnly: backward from every output
            grads[:] = grads or [torch.randn_like(o) for o in out]
            torch.autograd.backward(out, grads)
        else:
            out.float().square().mean().backward()
    return step


def time_interleaved(steps, repeats, budget_s):
    """{name: best seconds of `repeats` calls} of every step, one call of each per round so that a change of the
    machine's load hits all variants alike; stops early after `budget_s` seconds of rounds."""
    for step in steps.values():
        step()                                       # warm-up (compilation, index tables, allocator)
    best = {name: float('inf') for name in steps}
    spent = 0.0
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            took = time.perf_counter() - start
            best[name] = min(best[name], took)
            spent += took
        if spent > budget_s:
            break
    return best


def crossover(rows, key, dim='dim', attn='attn'):
    """Smallest token count at which `dim` is faster than `attn` for `key` ('fwd' or 'fwd_bwd'), or None."""
    for r in rows:
        a, b = r.get(f'{dim}_{key}_s'), r.get(f'{attn}_{key}_s')
        if a is not None and b is not None and a < b:
            return r['tokens']
    return None


def ratios(row):
    """DiM's times over its GEMM-only time and over attention's, where both were measured."""
    out = {}
    for key in ('fwd', 'fwd_bwd'):
        for num, den in (('dim', 'dim_gemm_only'), ('dim_compiled', 'dim_gemm_only'), ('dim', 'attn'),
                         ('dim_compiled', 'attn'), ('dim_compiled', 'attn_compiled')):
            a, b = row.get(f'{num}_{key}_s'), row.get(f'{den}_{key}_s')
            if a is not None and b is not None:
                out[f'{num}/{den}_{key}'] = round(a / b, 3)
    return out


def plot(rows, variants, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for key, style in (('fwd', '-'), ('fwd_bwd', '--')):
        for i, name in enumerate(variants):
            pts = [(r['tokens'], r[f'{name}_{key}_s']) for r in rows if r.get(f'{name}_{key}_s') is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=f'C{i}', marker='o', label=f"{name} {key.replace('_', '+')}")
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('image tokens')
    ax.set_ylabel('seconds per image')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(name, dim, attn, mode):
    """(callable, module holding its parameters) for variant `name`; compiled variants are compiled afresh."""
    if name == 'dim':
        return dim, dim
    if name == 'dim_compiled':
        return compile_network(dim, mode), dim
    if name == 'dim_gemm_only':
        return GemmOnly(dim), dim
    if name == 'attn':
        return attn, attn
    return torch.compile(attn, mode=None if mode == 'default' else mode, fullgraph=True), attn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--width', type=int, default=256)
    parser.add_argument('--depth', type=int, default=9)
    parser.add_argument('--grids', type=int, nargs='+', default=[16, 32, 64, 96])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--compile', default='default', choices=[m for m in COMPILE_MODES if m != 'none'],
                        help='torch.compile mode of the *_compiled variants')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds (best of) per grid and pass')
    parser.add_argument('--budget', type=float, default=120.0, help='seconds of timed rounds per grid and pass at most')
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
    fmt = lambda v: '   -   ' if v is None else f'{v:7.4f}'
    for g in args.grids:
        row = {'grid': g, 'tokens': g * g}
        torch._dynamo.reset()                           # compiled variants: static graphs for this grid
        built = {name: build(name, dim, attn, args.compile) for name in args.variants}
        for train in (False, True):
            key = 'fwd_bwd' if train else 'fwd'
            for name in args.variants:
                row[f'{name}_{key}_s'] = None
            if train and g > args.skip_train_above:
                continue
            steps = {name: make_step(model, module, g, args.batch, train) for name, (model, module) in built.items()}
            for name, seconds in time_interleaved(steps, args.repeats, args.budget).items():
                row[f'{name}_{key}_s'] = seconds / args.batch
        row['ratios'] = ratios(row)
        rows.append(row)
        print(f"{g:3d}^2 = {g * g:5d} tokens | " + ' | '.join(
            f"{name} fwd {fmt(row[f'{name}_fwd_s'])} fwd+bwd {fmt(row[f'{name}_fwd_bwd_s'])}"
            for name in args.variants) + f" | s/img\n    ratios {row['ratios']}", flush=True)
    result = {
        'device': platform.processor() or platform.machine(), 'threads': args.threads, 'torch': torch.__version__,
        'scan_backend': scan_backend('cpu'), 'compile_mode': args.compile, 'width': args.width, 'depth': args.depth,
        'patch_size': 2, 'batch': args.batch, 'parameters': params, 'variants': args.variants,
        'timing': f'best of {args.repeats} interleaved rounds, seconds per image', 'rows': rows,
        'crossover_tokens': {f'{d}_vs_{a}_{k}': crossover(rows, k, d, a) for k in ('fwd', 'fwd_bwd')
                             for d, a in (('dim', 'attn'), ('dim_compiled', 'attn_compiled'))},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'model.json'), 'w') as f:
        json.dump(result, f, indent=2)
    plot(rows, args.variants, os.path.join(args.out, 'model.png'),
         f"DiM vs attention, width {args.width}, depth {args.depth}, patch 2, CPU {args.threads} thread(s)")
    print(f"DiM cheaper than attention from (tokens) {result['crossover_tokens']}; "
          f"wrote {os.path.join(args.out, 'model.json')} and model.png")
    return result


if __name__ == '__main__':
    main()
