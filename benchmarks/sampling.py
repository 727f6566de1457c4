"""Sampling throughput (images/s) with classifier-free guidance batched into one network call.

    python benchmarks/sampling.py [--configs digits_DiM_tiny cifar10_S_DiM] [--out benchmarks/results]

For each config: a randomly initialised network of the config's size, the config's DPM-Solver with guidance
(one batched cond + uncond call per step), eager vs compiled through libs/model/compile.py (`compile_network`, the helper
train and eval use; `--compile MODE`), fp32 vs bf16 autocast. Writes sampling.json.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import sde                                      # noqa: E402
from libs import get_nnet                       # noqa: E402
from libs.model.compile import COMPILE_MODES, compile_network  # noqa: E402
from libs.config import load_config      # noqa: E402
from libs.scan import scan_backend    # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs')


def run(nnet, z, y, steps, guidance, K, autocast):
    def eps_fn(x, t, labels):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            return nnet(x, t, labels).float()
    return sde.sample(eps_fn, z, algorithm='dpm_solver', sample_steps=steps, y=y, scale=guidance, null_class=K)


def bench(name, batch, steps, variants, repeats, mode):
    config = load_config(os.path.join(CONFIGS, f'{name}.py'))
    kwargs = config.nnet.to_dict()
    kwargs.pop('pretrained_path', None)
    torch.manual_seed(0)
    nnet = get_nnet(**kwargs).eval()
    K = kwargs['num_embeds_ada_norm']
    z = torch.randn(batch, *config.z_shape)
    y = torch.arange(batch) % K
    guidance = float(config.sample.get('scale', 0.4)) or 0.4
    rows = []
    for compiled, autocast in variants:
        torch._dynamo.reset()
        net = compile_network(nnet, mode) if compiled else nnet
        start = time.perf_counter()
        with torch.no_grad():
            run(net, z, y, 1, guidance, K, autocast)             # warm-up (and compilation)
        warm = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                run(net, z, y, steps, guidance, K, autocast)
            times.append(time.perf_counter() - start)
        best = min(times)
        compile_mode = mode if compiled else 'none'
        rows.append(dict(config=name, compiled=compile_mode, bf16_autocast=autocast, batch=batch, steps=steps,
                         network_calls=steps, images_per_sec=batch / best, seconds=best, warmup_s=warm))
        print(f"{name:16s} compile={compile_mode:8s} bf16={str(autocast):5s} batch {batch} x {steps} steps: "
              f"{batch / best:8.2f} images/s (warm-up {warm:.1f} s)", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='+', default=['digits_DiM_tiny', 'cifar10_S_DiM'])
    parser.add_argument('--batch', type=int, nargs='+', default=[100, 4], help='one per config')
    parser.add_argument('--steps', type=int, nargs='+', default=[25, 10], help='one per config')
    parser.add_argument('--compile', default='default', choices=COMPILE_MODES,
                        help="compile mode of the compiled variants ('none': eager only)")
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [(False, False), (False, True)] + ([] if args.compile == 'none' else [(True, False), (True, True)])
    rows = []
    for name, batch, steps in zip(args.configs, args.batch, args.steps):
        rows += bench(name, batch, steps, variants, args.repeats, args.compile)
    result = {'device': platform.processor() or platform.machine(), 'threads': args.threads,
              'torch': torch.__version__, 'scan_backend': scan_backend('cpu'), 'rows': rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'sampling.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
