"""Training step time and peak memory per config size, on whatever device it runs on.

    python benchmarks/train_step.py [--configs digits_DiM_tiny cifar10_S_DiM ...] [--device cpu|cuda]
        [--batch B] [--gradient-checkpointing config|on|off|both] [--recompute config|on|off|auto|both] [--bf16]
        [--steps 5] [--warmup 2] [--out FILE]

Each case runs the training's own step (libs.training.state.TrainState and libs.training.step.TrainStep: the
diffusion loss, forward and backward under the launch's autocast, gradient clipping, AdamW (fused on CUDA), the
LR schedule and the EMA update; TF32 and cudnn.benchmark on CUDA) for the config's network with random weights on
synthetic latents (random, of config.z_shape, made once on the device: no data loading, no autoencoder), one
micro-batch of B samples per step, in a fresh process (one Accelerator per process, and a clean peak). B defaults
to the config's per-GPU batch on 8 GPUs (config.train.batch_size / 8).

Reported per case: mean step time over --steps timed steps after --warmup (the device synchronised at both
ends), samples/s, and peak memory: on CUDA torch.cuda.max_memory_allocated over the timed steps (weights,
gradients, optimizer state, EMA and activations), on CPU the process's peak resident memory (which includes the
Python and library baseline, printed separately). A case that fails (e.g. out of memory) is reported with its
error. From Python:

    from benchmarks.train_step import measure
    measure('imagenet256_H_DiM', device='cuda', batch=32, gradient_checkpointing=True, bf16=True)   # -> dict
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
CONFIGS = ('digits_DiM_tiny', 'cifar10_S_DiM', 'imagenet256_L_DiM', 'imagenet256_H_DiM', 'imagenet512_H_DiM_ft')

__all__ = ['measure', 'run_case', 'CONFIGS']


def measure(config, device='cpu', batch=None, gradient_checkpointing=None, bf16=False, steps=5, warmup=2,
            timeout=None, recompute=None):
    """One case in a fresh process (see the module docstring); returns its result dict (with 'error' if it failed).
    gradient_checkpointing / recompute None keep the config's settings (recompute: 'on', 'off' or 'auto')."""
    case = dict(config=config, device=device, batch=batch, gradient_checkpointing=gradient_checkpointing, bf16=bf16,
                steps=steps, warmup=warmup, recompute=recompute)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--one', json.dumps(case)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**case, 'error': f'timed out after {timeout} s'}
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ['(no output)'])[-1]
        return {**case, 'error': f'exit status {proc.returncode}: {tail}'}
    return json.loads(lines[-1])


class SyntheticLatents:
    """Stands in for libs.training.data.TrainData: the same (z, y) micro-batch, on the device, every step."""

    def __init__(self, config, batch, device):
        import torch
        g = torch.Generator(device=device).manual_seed(0)
        self.z = torch.randn((batch, *config.z_shape), generator=g, device=device)
        K = config.nnet.get('num_embeds_ada_norm', 1000)
        self.y = torch.randint(0, K + 1, (batch,), generator=g, device=device)

    def next_batch(self, batches, rng):
        return self.z, self.y


def _rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def run_case(config, device='cpu', batch=None, gradient_checkpointing=None, bf16=False, steps=5, warmup=2,
             recompute=None):
    """The case in this process (it creates the process's Accelerator); returns the result dict."""
    os.environ['ACCELERATE_MIXED_PRECISION'] = 'bf16' if bf16 else 'no'
    if device == 'cpu':
        os.environ['ACCELERATE_USE_CPU'] = '1'
    sys.path.insert(0, ROOT)
    import torch
    from libs.config import load_config
    from libs.training import launch
    from libs.training.state import TrainState
    from libs.training.step import TrainStep

    name = config
    config = load_config(os.path.join(ROOT, 'configs', f'{name}.py'))
    if 'pretrained_path' in config.nnet:                 # random weights
        del config.nnet['pretrained_path']
    batch = batch or max(1, config.train.batch_size // 8)
    config.train.batch_size, config.gradient_accumulation_steps = batch, 1
    if gradient_checkpointing is not None:
        config.gradient_checkpointing = bool(gradient_checkpointing)
    if recompute is not None:
        config.recompute = recompute
    acc = launch.make_accelerator(config)
    if acc.device.type != torch.device(device).type:
        raise RuntimeError(f'asked for {device}, accelerate runs on {acc.device}')
    launch.configure_cuda(acc.device)
    cuda = acc.device.type == 'cuda'
    with tempfile.TemporaryDirectory() as empty:
        state = TrainState(config, acc, empty)
    step = TrainStep(config, acc, state, SyntheticLatents(config, batch, acc.device))

    def sync():
        if cuda:
            torch.cuda.synchronize(acc.device)

    for _ in range(warmup):
        step(None)
    sync()
    rss_before = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(acc.device)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = step(None)
    sync()
    elapsed = (time.perf_counter() - start) / steps
    result = dict(config=name, device=torch.cuda.get_device_name(acc.device) if cuda else platform.processor() or 'cpu',
                  device_type=acc.device.type, batch=batch, gradient_checkpointing=config.gradient_checkpointing,
                  recompute=bool(acc.unwrap_model(state.nnet).recompute),
                  bf16=bool(bf16), params_m=round(state.n_params / 1e6, 2), steps=steps, warmup=warmup,
                  step_time_s=round(elapsed, 4), samples_per_s=round(batch / elapsed, 2),
                  loss=float(loss), torch=torch.__version__, threads=torch.get_num_threads())
    if cuda:
        result.update(peak_memory_gb=round(torch.cuda.max_memory_allocated(acc.device) / 2 ** 30, 3),
                      peak_reserved_gb=round(torch.cuda.max_memory_reserved(acc.device) / 2 ** 30, 3))
    else:
        result.update(peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
                      rss_before_steps_gb=round(rss_before / 1024, 3))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--batch', type=int, default=None, help='samples per step (default: config batch / 8)')
    parser.add_argument('--gradient-checkpointing', default='config', choices=('config', 'on', 'off', 'both'))
    parser.add_argument('--recompute', default='config', choices=('config', 'on', 'off', 'auto', 'both'))
    parser.add_argument('--bf16', action='store_true', help='bf16 autocast (the launch\'s --mixed_precision bf16)')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--timeout', type=float, default=None, help='seconds per case')
    parser.add_argument('--out', default=None, help='write the results here as JSON')
    parser.add_argument('--one', default=None, help=argparse.SUPPRESS)   # internal: run one case, print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(**json.loads(args.one))))
        return
    checkpointing = {'config': [None], 'on': [True], 'off': [False], 'both': [False, True]}[args.gradient_checkpointing]
    recompute = {'config': [None], 'both': ['on', 'off']}.get(args.recompute, [args.recompute])
    results = []
    for name in args.configs:
        for gc, rc in [(gc, rc) for gc in checkpointing for rc in recompute]:
            r = measure(name, args.device, args.batch, gc, args.bf16, args.steps, args.warmup, args.timeout, rc)
            results.append(r)
            memory = (f"peak {r['peak_memory_gb']} GB" if 'peak_memory_gb' in r else
                      f"peak RSS {r['peak_rss_gb']} GB (before the steps {r['rss_before_steps_gb']})"
                      if 'peak_rss_gb' in r else '')
            print(f"{name:24s} batch {r.get('batch')} ckpt {r.get('gradient_checkpointing')} recompute "
                  f"{r.get('recompute')} bf16 {args.bf16}: " +
                  (f"{r['step_time_s']:.3f} s/step, {r['samples_per_s']} samples/s, {memory}" if 'error' not in r
                   else f"failed: {r['error']}"), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
