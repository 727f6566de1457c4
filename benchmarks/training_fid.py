"""Wall-clock cost of train_ldm_discrete.py's in-training FID (libs/training/evaluation.py) for a tiny latent DiM on CPU,
with 1 and with 2 processes.

    python benchmarks/training_fid.py [--n 1000] [--steps 50] [--batch 50] [--processes 1 2] [--cores 2]
        [--out benchmarks/results/training_fid.json]

Each case is a real run of train_ldm_discrete.py in a fresh temporary folder: 2 training steps of a tiny latent
DiM (width 32, 3 layers, patch 2, 4x4x4 latents, 1000 classes) on 16 random feature files, then the FID of its EMA
network at step 2 on --n samples (DPM-Solver, --steps steps, guidance 0.4, mini-batches of --batch), decoded by a
tiny random VAE (8x8 images) and scored by the FID Inception. The Inception weights, the VAE and the reference
statistics are random (made here, nothing downloaded): the speed does not depend on the values, only the FID value
is meaningless. The time is the in-training FID's own `fid<N>_time_s` from the run's log.jsonl (sampling, decoding,
Inception, gathering, metrics); the final evaluation of the best checkpoint that ends every run (--batch samples)
is not timed. 1 process: `python`; 2 processes: accelerate launch on gloo; both with ACCELERATE_USE_CPU=1 and
OMP_NUM_THREADS = --cores / processes (default 2 cores, the machine this was written for: 2 threads for 1 process,
1 each for 2). The 10k figure is measured with --n 10000, otherwise extrapolated linearly (the JSON says which).
The FID is the same for every process count (index-sharded sampling, uint8 images) when every process runs the
same number of threads; a different thread count changes the Inception's float rounding (seen: 3e-5 to 3e-3 on
FIDs near 4500), so with the default --cores 2 the 1- and 2-process FIDs may differ in the last digits (--cores 1
makes them identical). The JSON says whether they are.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from benchmarks.machine import cpu_name                          # noqa: E402
from libs.evaluation.adm_metrics import save_reference                      # noqa: E402
from libs.data.autoencoder import ldm_vae_layout                      # noqa: E402
from libs.evaluation.fid import fid_inception_v3                            # noqa: E402

SCRIPT = os.path.join(os.path.abspath(ROOT), 'train_ldm_discrete.py')
ACCELERATE = (sys.executable, '-m', 'accelerate.commands.accelerate_cli', 'launch', '--multi_gpu',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0')
NNET = dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=3, in_channels=4, out_channels=4, patch_size=2,
            sample_size=4, num_embeds_ada_norm=1000)
VAE = dict(block_out_channels=(32, 64), layers_per_block=1)       # 4x8x8 latents <-> 16x16 images; here 4x4 -> 8x8
CONFIG = '''
import ml_collections


def d(**kwargs):
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 7
    config.z_shape = (4, 4, 4)
    config.autoencoder = d(pretrained_path={vae!r})
    config.gradient_accumulation_steps = 1
    config.max_grad_norm = 1.0
    config.train = d(n_steps=2, batch_size=4, mode='cond', log_interval=2, eval_interval=1000000, save_interval=2,
                     fid_interval=2, num_workers=0, grid_columns=2)
    config.optimizer = d(name='adamw', lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
    config.lr_scheduler = d(name='customized', warmup_steps=0)
    config.nnet = d(**{nnet!r})
    config.dataset = d(name='imagenet256_features', path={features!r}, p_uncond=0.1, fid_stat={stats!r})
    config.sample = d(sample_steps={steps}, n_samples={batch}, intermediate_n_samples={n}, mini_batch_size={batch},
                      algorithm='dpm_solver', cfg=True, scale=0.4, path='', inception_path={inception!r})
    return config
'''


def random_state_dict(shapes, seed=0):
    """Random weights for `shapes` ({key: shape}) that keep activations O(1): conv weights ~ N(0, 1/fan_in) (He
    for the Inception's ReLUs), norm scales ~1, BatchNorm running variances in [0.5, 1.5], the rest small."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith('num_batches_tracked'):
            sd[key] = torch.tensor(0)
        elif len(shape) == 4:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith('running_var'):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif ('norm' in key or 'bn' in key) and key.endswith('weight'):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


def make_assets(root, n, steps, batch):
    """The run's files in `root` (VAE, Inception, statistics, features, config); returns the config's path."""
    paths = {k: os.path.join(root, v) for k, v in dict(vae='autoencoder_kl_ema.pth', inception='pt_inception.pth',
                                                        stats='fid_stats.npz', features='features',
                                                        config='tiny_fid.py').items()}
    torch.save(random_state_dict(ldm_vae_layout(**VAE)), paths['vae'])
    with torch.device('meta'):
        shapes = {k: tuple(v.shape) for k, v in fid_inception_v3().state_dict().items()}
    inception = random_state_dict(shapes)
    for key, shape in shapes.items():                               # He init: the Inception's convs feed ReLUs
        if len(shape) == 4:
            inception[key] *= math.sqrt(2)
    torch.save(inception, paths['inception'])
    save_reference(paths['stats'], np.zeros(2048), np.eye(2048))
    os.makedirs(paths['features'])
    rng = np.random.default_rng(0)
    for i in range(16):                                  # moments (mean | logvar) and a label, the official format
        np.savez(os.path.join(paths['features'], f'{i}.npy.npz'),
                 z=rng.normal(size=(8, 4, 4)).astype(np.float32), label=np.int64(rng.integers(1000)))
    with open(paths['config'], 'w') as f:
        f.write(CONFIG.format(vae=paths['vae'], nnet=NNET, features=paths['features'], stats=paths['stats'],
                              inception=paths['inception'], n=n, steps=steps, batch=batch))
    return paths['config']


def run_case(config, workdir, processes, cores=2, timeout=None):
    """One training run with `processes` CPU processes sharing `cores` threads; {fid, fid_time_s, run_wall_s, ...}
    (run_wall_s: the whole run, start-up, training and final evaluation included)."""
    env = dict(os.environ, WANDB_MODE='disabled', PYTHONUNBUFFERED='1', ACCELERATE_USE_CPU='1',
               OMP_NUM_THREADS=str(max(1, cores // processes)),
               XDG_CACHE_HOME=os.path.join(os.path.dirname(workdir), 'xdg_cache'))
    env.pop('DIM_SCAN_BACKEND', None)
    launcher = (sys.executable,) if processes == 1 else (*ACCELERATE, '--num_processes', str(processes))
    cmd = [*launcher, SCRIPT, f'--config={config}', f'--workdir={workdir}']
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(workdir))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    with open(os.path.join(workdir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    name = next(k[:-len('_time_s')] for r in records for k in r if k.startswith('fid') and k.endswith('_time_s'))
    record = next(r for r in records if f'{name}_time_s' in r)
    return dict(processes=processes, omp_threads=int(env['OMP_NUM_THREADS']), step=record['step'],
                fid=record[name], fid_time_s=record[f'{name}_time_s'], run_wall_s=round(wall, 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--n', type=int, default=1000, help='samples of the in-training FID')
    parser.add_argument('--steps', type=int, default=50, help='sampler steps (the official in-training FID: 50)')
    parser.add_argument('--batch', type=int, default=50, help='config.sample.mini_batch_size')
    parser.add_argument('--processes', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--cores', type=int, default=2, help='OMP threads shared out among the processes')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                                      'training_fid.json'))
    parser.add_argument('--timeout', type=float, default=None, help='seconds per run')
    args = parser.parse_args(argv)
    results = dict(machine=cpu_name(), cpu_count=os.cpu_count(),
                   cores=args.cores, n=args.n,
                   sample_steps=args.steps, mini_batch_size=args.batch, algorithm='dpm_solver', guidance=0.4,
                   nnet=NNET, z_shape=[4, 4, 4], image_size=8, weights='random', cases=[])
    with tempfile.TemporaryDirectory() as root:
        config = make_assets(root, args.n, args.steps, args.batch)
        for p in args.processes:
            case = run_case(config, os.path.join(root, f'run{p}'), p, args.cores, args.timeout)
            case.update(s_per_1000=round(case['fid_time_s'] * 1000 / args.n, 2),
                        s_per_10000=round(case['fid_time_s'] * 10000 / args.n, 1))
            results['cases'].append(case)
    fids = [c['fid'] for c in results['cases']]
    results['fid_identical_across_processes'] = len(set(fids)) == 1
    results['fid_max_abs_difference'] = float(max(fids) - min(fids))
    print(f"in-training FID of a tiny latent DiM on CPU: {args.n} samples, {args.steps} DPM-Solver steps, "
          f"mini-batch {args.batch}; 'run s': the whole run, not only the FID")
    results['s_per_10000_is'] = 'measured' if args.n == 10000 else 'extrapolated linearly'
    ten_k = 's / 10k' + ('' if args.n == 10000 else ' (extrap.)')
    print(f"{'processes':>9} {'threads':>7} {'seconds':>9} {'s / 1k':>8} {ten_k:>18} {'FID':>12} {'run s':>7}")
    for c in results['cases']:
        print(f"{c['processes']:>9} {c['omp_threads']:>7} {c['fid_time_s']:>9.2f} {c['s_per_1000']:>8.2f} "
              f"{c['s_per_10000']:>18.1f} {c['fid']:>12.6g} {c['run_wall_s']:>7.1f}")
    if len(fids) > 1:
        print('FID identical across process counts:', results['fid_identical_across_processes'],
              '' if results['fid_identical_across_processes'] else
              f"(max difference {results['fid_max_abs_difference']:.3g})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=2)
    print('wrote', args.out)
    return results


if __name__ == '__main__':
    main()
