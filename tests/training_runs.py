"""Helpers of the end-to-end training tests: a tiny digits run, its launchers, a real SIGKILL of every process."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import torch

from conftest import ROOT

SCRIPT = str(ROOT / 'train_ldm_discrete.py')
SHIM = str(ROOT / 'tests' / 'sharded_launch.py')
ACCELERATE = (sys.executable, '-m', 'accelerate.commands.accelerate_cli', 'launch')
# Two CPU processes on gloo. accelerate's `--cpu --num_processes N` starts N processes only through MPI;
# `--multi_gpu` with ACCELERATE_USE_CPU=1 starts them through torchrun (see README).
CPU_LAUNCH = (*ACCELERATE, '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
              '--dynamo_backend', 'no', '--main_process_port', '0')
TINY = ['--config=' + str(ROOT / 'configs' / 'digits_DiM_tiny.py'),
        '--config.nnet.attention_head_dim=32', '--config.nnet.num_layers=3', '--config.train.batch_size=8',
        '--config.train.log_interval=2', '--config.train.eval_interval=1000', '--config.train.report_per_class=2',
        '--config.sample.sample_steps=2', '--config.sample.mini_batch_size=20', '--config.train.grid_columns=2',
        '--config.sample.n_samples=20']

_FSDP = str(ROOT / 'configs' / 'accelerate' / 'fsdp_shard_grad_op.yaml')
_ZERO2 = str(ROOT / 'configs' / 'accelerate' / 'deepspeed_zero2.yaml')
# The real launch configs, run by tests/sharded_launch.py in 2 CPU processes. FSDP's sync_module_states asks the
# current CUDA device for its broadcast; every process builds the same weights anyway.
SHARDED_LAUNCH = {
    'fsdp1': (_FSDP, '--mixed_precision', 'no', '--fsdp_version', '1', '--fsdp_sync_module_states', 'false'),
    'fsdp2': (_FSDP, '--mixed_precision', 'no', '--fsdp_version', '2', '--fsdp_sync_module_states', 'false'),
    'fsdp2_bf16': (_FSDP, '--mixed_precision', 'bf16', '--fsdp_version', '2', '--fsdp_sync_module_states', 'false'),
    'zero2': (_ZERO2, '--mixed_precision', 'no'),
    'zero2_bf16': (_ZERO2, '--mixed_precision', 'bf16'),
}


def sharded_launcher(mode):
    config_file, *flags = SHARDED_LAUNCH[mode]
    return (*ACCELERATE, '--config_file', config_file, '--num_processes', '2', '--main_process_port', '0',
            *flags, SHIM)


def env(tmp_path, use_cpu=True):
    out = dict(os.environ, WANDB_MODE='disabled', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               XDG_CACHE_HOME=str(tmp_path.parent / 'xdg_cache'))
    out.pop('DIM_SCAN_BACKEND', None)
    out.pop('ACCELERATE_USE_CPU', None)
    if use_cpu:
        out['ACCELERATE_USE_CPU'] = '1'
    return out


def command(workdir, *args, launcher=(sys.executable,), base=TINY):
    return [*launcher, SCRIPT, *base, f'--workdir={workdir}', *args]


def run(tmp_path, workdir, *args, launcher=(sys.executable,), check=True, timeout=600, use_cpu=True, base=TINY):
    """Run the training script (`base`: the config arguments, default the tiny digits run) to the end."""
    cmd = command(workdir, *args, launcher=launcher, base=base)
    proc = subprocess.run(cmd, env=env(tmp_path, use_cpu), capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start(tmp_path, workdir, *args, launcher=(sys.executable,), use_cpu=True, base=TINY, session=False):
    """Start the training script in the background, its output into a log file; (process, log path). `session`:
    in a session (and process group) of its own, as a cluster job."""
    log_path = tmp_path / f'{os.path.basename(workdir)}-{time.time():.0f}.log'
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(command(workdir, *args, launcher=launcher, base=base), env=env(tmp_path, use_cpu),
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=session)
    return proc, log_path


def wait_until(condition, proc, timeout=600):
    """Poll `condition()` until it holds; fails if the process ends first or the time runs out."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f'the run ended (exit code {proc.returncode}) before the awaited state'
        assert time.time() < deadline, 'timed out'
        time.sleep(0.02)


def checkpoint_steps(workdir):
    return sorted(int(p.split('.')[0]) for p in os.listdir(workdir / 'ckpts') if p.endswith('.ckpt'))


def logged_step(workdir):
    """The last step with a loss record in log.jsonl (0 before the first)."""
    try:
        return max([r['step'] for r in records(workdir) if 'loss' in r], default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def run_and_kill_after(tmp_path, workdir, step, *args, launcher=(sys.executable,), use_cpu=True, timeout=600,
                       base=TINY):
    """Start a run, SIGKILL it and every process it started as soon as checkpoint `step` exists; the steps of the
    checkpoints it left."""
    proc, _ = start(tmp_path, workdir, *args, launcher=launcher, use_cpu=use_cpu, base=base)
    deadline = time.time() + timeout
    while not (workdir / 'ckpts' / f'{step}.ckpt').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    return checkpoint_steps(workdir)


def kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun's workers run in sessions of their own)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, alive


def records(workdir):
    with open(os.path.join(workdir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def state(workdir, step, name):
    return torch.load(os.path.join(workdir, 'ckpts', f'{step}.ckpt', name), weights_only=True)


def same_tree(a, b):
    flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(flat_a) == len(flat_b) and all(
        torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b))
