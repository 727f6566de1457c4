"""Shared parts of benchmarks/gpu_check.py's sections: the worker context, sizes, timing, config literals.

Nothing here imports torch at module level (the driver and the training-step section run without it).
"""
import ast
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')
# Not on the GPU machine's image: gpu_check's own processes must not import them (ml_collections comes as a
# carried wheel for the sections that load a training config; see gpu_check.py).
FORBIDDEN = ('ml_collections', 'diffusers', 'pytorch_fid', 'wandb')

# Sizes per mode. 'gpu': the real check on one card; 'dry': the same code on CPU with tiny shapes (Triton interpreted).
SIZES = {
    'gpu': dict(
        card=dict(copy_mib=2048, matmul_n=8192, reps=10),
        dispatch=dict(mixer_width=64, mixer_L=366, batch=2),
        rng=dict(model=dict(attention_head_dim=32, num_layers=3, sample_size=8, num_embeds_ada_norm=10),
                 batch=8, steps=6, resume_at=3),
        # (batch, Di, L, segments override or None)
        scan_parity=dict(cases=[('fp32', (2, 96, 366), None), ('fp32', (1, 64, 1230), None),
                                ('fp32', (2, 48, 300), 2), ('bf16', (2, 96, 366), None),
                                ('bf16', (1, 64, 1230), None)], d_state=16),
        scan_speed=dict(shapes=[(96, 3072, 366), (16, 3072, 1230), (1, 3072, 4494), (1, 3072, 9806)], d_state=16,
                        warmup=2, reps=20, max_s=1.5),
        scan_sweep=dict(shapes=[0, 2], warmup=1, reps=10, max_s=0.6),
        triton_warm=dict(timeout=150, parallel=8),
        # batch = 2 x sample_batch (CFG doubles the sampler's network batch): a compiled network meets one shape
        model=dict(resolutions={256: dict(config='imagenet256_H_DiM', batch=64, sample_batch=32),
                                512: dict(config='imagenet512_H_DiM_ft', batch=16, sample_batch=8)},
                   overrides={}, compiled_resolutions=(256, 512), steps=50, sample_runs=1, warmup=2, reps=5, max_s=3.0),
        host_syncs=dict(config='digits_DiM_tiny', batch=16, warmup=2, steps=3),
        train=dict(configs={256: 'imagenet256_H_DiM', 512: 'imagenet512_H_DiM_ft'}, device='cuda',
                   probe={False: 16, True: 32}, steps=3, warmup=1, multiple=8, max_batch=4096, usable=0.92),
    ),
    'dry': dict(
        card=dict(copy_mib=16, matmul_n=256, reps=3),
        dispatch=dict(mixer_width=16, mixer_L=20, batch=2),
        rng=dict(model=dict(attention_head_dim=16, num_layers=3, sample_size=4, num_embeds_ada_norm=10),
                 batch=2, steps=4, resume_at=2),
        scan_parity=dict(cases=[('fp32', (1, 8, 19), None), ('fp32', (1, 8, 40), 2), ('bf16', (1, 8, 19), None)],
                         d_state=4),
        scan_speed=dict(shapes=[(2, 8, 9), (1, 8, 12), (1, 8, 17), (1, 8, 20)], d_state=4, warmup=0, reps=1,
                        max_s=0.0),
        scan_sweep=dict(shapes=[0], warmup=0, reps=1, max_s=0.0, max_variants=2),
        triton_warm=dict(timeout=60, parallel=1, shapes=[(1, 4, 5)]),
        model=dict(resolutions={256: dict(config='imagenet256_H_DiM', batch=2, sample_batch=1),
                                512: dict(config='imagenet512_H_DiM_ft', batch=2, sample_batch=1)},
                   overrides=dict(attention_head_dim=16, num_layers=3), sample_size={256: 4, 512: 8},
                   compiled_resolutions=(256,),
                   steps=2, sample_runs=1, warmup=1, reps=1, max_s=0.0),
        host_syncs=dict(config='digits_DiM_tiny', batch=2, warmup=1, steps=1),
        train=dict(configs={256: 'digits_DiM_tiny'}, device='cpu', probe={False: 2, True: 2}, steps=1, warmup=1,
                   multiple=1, max_batch=2, usable=0.92),
    ),
}


class Ctx:
    """What a section's worker gets: mode, earlier sections' results, its deadline; `save` keeps partial results
    on disk (the driver reads them back if the worker is stopped at its deadline)."""

    def __init__(self, name, data, part_path):
        self.name, self.part_path = name, part_path
        self.dry = bool(data['dry_run'])
        self.results = data['results']
        self.deadline = float(data['deadline'])
        self.args = data.get('args', {})
        self.result = {}

    @property
    def device(self):
        return 'cpu' if self.dry else 'cuda'

    def sizes(self, key=None):
        return SIZES['dry' if self.dry else 'gpu'][key or self.name]

    def left(self):
        """Seconds left in this section's budget."""
        return self.deadline - time.time()

    def save(self, **values):
        self.result.update(values)
        write_json(self.part_path, dict(self.result, status='running'))

    def card(self, key):
        """A figure of the card section (KeyError if it did not produce it)."""
        return self.results['card'][key]


def write_json(path, obj):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, default=_json_default, allow_nan=True)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def forbidden_imported(allowed=()):
    return sorted(m for m in FORBIDDEN if m not in allowed and m in sys.modules)


# ---------------------------------------------------------------------------------------------------------- timing

def sync(device):
    import torch
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def time_fn(fn, device, warmup=2, reps=10, max_s=1.0):
    """Median / min milliseconds of fn() after `warmup` calls; CUDA events per call on CUDA, else the host clock.
    Stops after `reps` calls or once `max_s` seconds of calls are spent (at least one call)."""
    import torch
    for _ in range(warmup):
        fn()
    sync(device)
    cuda = torch.device(device).type == 'cuda'
    times, spent = [], 0.0
    while len(times) < max(1, reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = 1e3 * (time.perf_counter() - t0)
        times.append(ms)
        spent += ms / 1e3
        if spent >= max_s:
            break
    times.sort()
    return dict(median_ms=times[len(times) // 2], min_ms=times[0], reps=len(times))


def rel_err(a, b):
    """(||a - b|| / ||b||, max|a - b| / max|b|) in float64; inf when a has a non-finite value."""
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if not bool(a.isfinite().all()):
        return float('inf'), float('inf')
    d = a - b
    return ((d.norm() / b.norm().clamp_min(1e-300)).item(),
            (d.abs().max() / b.abs().max().clamp_min(1e-300)).item())


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------- config literals

def _literal(node):
    """A config value: a literal, or d(...)/ConfigDict-style call with literal keyword arguments (-> dict)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'd' and not node.args:
        return {k.arg: _literal(k.value) for k in node.keywords}
    return ast.literal_eval(node)


def config_literals(name):
    """The `config.X = <literal or d(...)>` assignments of configs/<name>.py, read without running it (it imports
    ml_collections, which the GPU machine lacks): {'nnet': {...}, 'z_shape': (...), 'sample': {...}, ...}.
    Assignments whose value is not a literal are left out."""
    path = os.path.join(CONFIGS, f'{name}.py')
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute)
                and isinstance(node.targets[0].value, ast.Name) and node.targets[0].value.id == 'config'):
            try:
                out[node.targets[0].attr] = _literal(node.value)
            except ValueError:
                continue
    if 'nnet' not in out:
        raise ValueError(f"{path}: no literal `config.nnet = d(...)` assignment")
    return out


def nnet_kwargs(name):
    """config.nnet of configs/<name>.py as keyword arguments of libs.model.build.build_nnet (random weights: no
    pretrained_path)."""
    kwargs = dict(config_literals(name)['nnet'])
    kwargs.pop('pretrained_path', None)
    return kwargs
