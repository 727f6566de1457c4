"""train_ldm_discrete.py end to end on CPU: outputs, exact resume after a real kill, 2 processes, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

SCRIPT = str(ROOT / 'train_ldm_discrete.py')
# Two CPU processes on gloo. accelerate's `--cpu --num_processes N` starts N processes only through MPI;
# `--multi_gpu` with ACCELERATE_USE_CPU=1 starts them through torchrun (see README).
CPU_LAUNCH = (sys.executable, '-m', 'accelerate.commands.accelerate_cli', 'launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0')
TINY = ['--config=' + str(ROOT / 'configs' / 'digits_DiM_tiny.py'),
        '--config.nnet.attention_head_dim=32', '--config.nnet.num_layers=3', '--config.train.batch_size=8',
        '--config.train.log_interval=2', '--config.train.eval_interval=1000', '--config.train.report_per_class=2',
        '--config.sample.sample_steps=2', '--config.sample.mini_batch_size=20', '--config.train.grid_columns=2']


def _env(tmp_path):
    env = dict(os.environ, WANDB_MODE='disabled', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               XDG_CACHE_HOME=str(tmp_path.parent / 'xdg_cache'))
    env.pop('DIM_SCAN_BACKEND', None)
    env['ACCELERATE_USE_CPU'] = '1'
    return env


def _run(tmp_path, workdir, *args, launcher=(sys.executable,), check=True, timeout=600):
    cmd = [*launcher, SCRIPT, *TINY, f'--workdir={workdir}', *args]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _records(workdir):
    with open(os.path.join(workdir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def _state(workdir, step, name):
    return torch.load(os.path.join(workdir, 'ckpts', f'{step}.ckpt', name), weights_only=True)


def test_training_writes_every_output(tmp_path):
    workdir = tmp_path / 'run'
    proc = _run(tmp_path, workdir, '--config.train.n_steps=6', '--config.train.save_interval=3',
                '--config.train.keep_ckpts=1')
    assert sorted(os.listdir(workdir / 'ckpts')) == ['6.ckpt']             # keep_ckpts=1
    assert sorted(os.listdir(workdir / 'ckpts' / '6.ckpt')) == sorted(
        ['nnet.pth', 'nnet_ema.pth', 'optimizer.pth', 'lr_scheduler.pth', 'step.pth', 'rng.pth'])
    for name in ('samples/6.png', 'loss_curve.png', 'report.json', 'config.json', 'output.log'):
        assert (workdir / name).exists(), name
    losses = [r for r in _records(workdir) if 'loss' in r]
    assert [r['step'] for r in losses] == [2, 4, 6]
    assert all(r['lr'] > 0 and r['grad_norm'] > 0 and r['samples_per_sec'] > 0 for r in losses)
    report = json.loads((workdir / 'report.json').read_text())
    assert 0 <= report['sample_accuracy'] <= 1 and report['step'] == 6
    assert str(workdir / 'report.json') in proc.stdout                  # the command says where outputs went
    ema = _state(workdir, 6, 'nnet_ema.pth')
    nnet = _state(workdir, 6, 'nnet.pth')
    assert ema.keys() == nnet.keys() and not all(torch.equal(ema[k], nnet[k]) for k in ema)
    assert _state(workdir, 6, 'step.pth') == 6


def test_resume_after_a_real_kill_is_exact(tmp_path):
    steps = ['--config.train.n_steps=24', '--config.train.save_interval=4']
    _run(tmp_path, tmp_path / 'straight', *steps)

    workdir = tmp_path / 'killed'
    cmd = [sys.executable, SCRIPT, *TINY, f'--workdir={workdir}', *steps]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (workdir / 'ckpts' / '4.ckpt').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sorted(int(p.split('.')[0]) for p in os.listdir(workdir / 'ckpts') if p.endswith('.ckpt'))
    assert killed_at and killed_at[-1] < 24, killed_at                   # it really died mid-run

    out = _run(tmp_path, workdir, *steps)
    assert f'resumed from {workdir}/ckpts/{killed_at[-1]}.ckpt' in out.stderr
    for name in ('nnet.pth', 'nnet_ema.pth', 'optimizer.pth'):
        a, b = _state(tmp_path / 'straight', 24, name), _state(workdir, 24, name)
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b)), name


def test_two_processes_stay_in_sync(tmp_path):
    workdir = tmp_path / 'ddp'
    _run(tmp_path, workdir, '--config.train.n_steps=4', '--config.train.save_interval=2', launcher=CPU_LAUNCH)
    records = _records(workdir)
    checksums = [r['weight_checksums'] for r in records if 'weight_checksums' in r]
    assert len(checksums) == 1 and len(checksums[0]) == 2 and checksums[0][0] == checksums[0][1]
    prints = [r['data_fingerprints'] for r in records if 'data_fingerprints' in r][0]
    assert len(prints) == 2 and prints[0] != prints[1]                    # each rank got different data
    assert [r['step'] for r in records if 'loss' in r] == [2, 4]            # logged once, by rank 0
    assert sorted(os.listdir(workdir / 'ckpts')) == ['2.ckpt', '4.ckpt']    # written once, no leftovers
    assert _state(workdir, 4, 'rng.pth')['world_size'] == 2


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    workdir = tmp_path / 'nan'
    proc = _run(tmp_path, workdir, '--config.train.n_steps=200', '--config.train.save_interval=1',
                '--config.optimizer.lr=1e12', '--config.lr_scheduler.warmup_steps=0', '--config.max_grad_norm=0',
                check=False)
    assert proc.returncode != 0
    assert 'training loss became' in proc.stderr and 'at step' in proc.stderr
    assert os.listdir(workdir / 'ckpts')                                   # earlier checkpoints stay


def test_corrupt_checkpoint_is_skipped(tmp_path):
    workdir = tmp_path / 'corrupt'
    _run(tmp_path, workdir, '--config.train.n_steps=4', '--config.train.save_interval=2')
    with open(workdir / 'ckpts' / '4.ckpt' / 'nnet.pth', 'wb') as f:
        f.write(b'truncated')
    (workdir / 'ckpts' / '.tmp-6-123').mkdir()                            # a half-written save
    out = _run(tmp_path, workdir, '--config.train.n_steps=6', '--config.train.save_interval=2')
    assert 'skipping unreadable checkpoint' in out.stderr and f'resumed from {workdir}/ckpts/2.ckpt' in out.stderr
    assert _state(workdir, 6, 'step.pth') == 6


@pytest.mark.parametrize('args, message', [
    (['--config.dataset.name=mnist'], "unknown data set 'mnist'"),
    (['--config.z_shape=(1, 8, 8)'], 'config.z_shape=(1, 8, 8) but data set'),
    (['--config.dataset.resolution=4'], 'digits resolution must be >= 8'),
    (['--config.train.mode=semi'], "config.train.mode='semi'"),
])
def test_bad_configs_fail_with_clear_messages(tmp_path, args, message):
    proc = _run(tmp_path, tmp_path / 'bad', '--config.train.n_steps=2', *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_missing_data_is_named(tmp_path):
    cmd = [sys.executable, SCRIPT, '--config=' + str(ROOT / 'configs' / 'cifar10_S_DiM.py'),
           f'--config.dataset.path={tmp_path}/cifar', f'--workdir={tmp_path}/run']
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert f'CIFAR-10 not found under {tmp_path}/cifar' in proc.stderr and 'cs.toronto.edu' in proc.stderr
