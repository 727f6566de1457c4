"""train_ldm_discrete.py end to end on CPU: outputs, exact resume after a real kill, 2 processes, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from training_runs import (CPU_LAUNCH, SCRIPT, env, records as _records, run, run_and_kill_after, same_tree,
                           state as _state)


def _env(tmp_path):
    return env(tmp_path)


def _run(tmp_path, workdir, *args, **kwargs):
    return run(tmp_path, workdir, *args, **kwargs)


def test_training_writes_every_output(tmp_path):
    workdir = tmp_path / 'run'
    proc = _run(tmp_path, workdir, '--config.train.n_steps=6', '--config.train.save_interval=3',
                '--config.train.fid_interval=3', '--config.train.keep_ckpts=1')
    best = json.loads((workdir / 'best.json').read_text())
    history = {e['step']: e['frechet_distance_digits'] for e in best['history']}
    assert sorted(history) == [3, 6] and best['metric'] == 'frechet_distance_digits'   # digits: its report's FD
    assert best['best_step'] == min(history, key=history.get) and best['best'] == min(history.values())
    # keep_ckpts=1: the newest, plus the best one (evaluated at the end)
    assert sorted(os.listdir(workdir / 'ckpts')) == sorted({'6.ckpt', f"{best['best_step']}.ckpt"})
    assert sorted(os.listdir(workdir / 'ckpts' / '6.ckpt')) == sorted(
        ['nnet.pth', 'nnet_ema.pth', 'optimizer.pth', 'lr_scheduler.pth', 'step.pth', 'rng.pth'])
    for name in ('samples/6.png', 'loss_curve.png', 'report.json', 'config.json', 'output.log',
                 'frechet_distance_digits_curve.png'):
        assert (workdir / name).exists(), name
    records = _records(workdir)
    losses = [r for r in records if 'loss' in r]
    assert [r['step'] for r in losses] == [2, 4, 6]
    assert all(r['lr'] > 0 and r['grad_norm'] > 0 and r['samples_per_sec'] > 0 for r in losses)
    assert [r['step'] for r in records if 'frechet_distance_digits' in r] == [3, 6]
    report = json.loads((workdir / 'report.json').read_text())
    assert 0 <= report['sample_accuracy'] <= 1 and report['step'] == 6
    assert str(workdir / 'report.json') in proc.stdout                  # the command says where outputs went
    # the final evaluation of the best checkpoint, as eval_ldm_discrete.py writes it
    final = workdir / 'eval' / f"{best['best_step']}.ckpt_nnet_ema"
    results = json.loads((final / 'results.json').read_text())
    assert results['n_samples'] == 20
    assert results['nnet_path'] == str(workdir / 'ckpts' / f"{best['best_step']}.ckpt" / 'nnet_ema.pth')
    assert best['final_evaluation']['results'] == str(final / 'results.json')
    assert str(final / 'results.json') in proc.stdout
    assert best['final_evaluation']['frechet_distance_digits'] == results['frechet_distance_digits']
    ema = _state(workdir, 6, 'nnet_ema.pth')
    nnet = _state(workdir, 6, 'nnet.pth')
    assert ema.keys() == nnet.keys() and not all(torch.equal(ema[k], nnet[k]) for k in ema)
    assert _state(workdir, 6, 'step.pth') == 6


def test_resume_after_a_real_kill_is_exact(tmp_path):
    steps = ['--config.train.n_steps=24', '--config.train.save_interval=4']
    _run(tmp_path, tmp_path / 'straight', *steps)

    workdir = tmp_path / 'killed'
    killed_at = run_and_kill_after(tmp_path, workdir, 4, *steps)
    assert killed_at and killed_at[-1] < 24, killed_at                   # it really died mid-run

    out = _run(tmp_path, workdir, *steps)
    assert f'resumed from {workdir}/ckpts/{killed_at[-1]}.ckpt' in out.stderr
    for name in ('nnet.pth', 'nnet_ema.pth', 'optimizer.pth', 'rng.pth'):
        assert same_tree(_state(tmp_path / 'straight', 24, name), _state(workdir, 24, name)), name


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


def test_config_values_are_checked_before_any_work(tmp_path):
    workdir = tmp_path / 'early'
    proc = _run(tmp_path, workdir, '--config.train.batch_size=-4', '--config.optimizer.lr=0', '--config.train.ema_rate=1.5',
                check=False)
    assert proc.returncode != 0
    assert 'config.train.batch_size=-4: must be an integer >= 1' in proc.stderr
    assert 'config.optimizer.lr=0.0: must be a number > 0' in proc.stderr
    assert 'config.train.ema_rate=1.5: must be a number in [0, 1]' in proc.stderr
    assert not workdir.exists()                                          # nothing made, nothing loaded


def test_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    workdir = tmp_path / 'split'
    proc = _run(tmp_path, workdir, '--config.train.batch_size=7', launcher=CPU_LAUNCH, check=False)
    assert proc.returncode != 0 and 'config.train.batch_size=7: the global batch size 7 is not divisible by the 2 processes' in proc.stderr
    assert not workdir.exists()


def test_checkpoints_that_cannot_be_resumed_stop_the_run(tmp_path):
    workdir = tmp_path / 'unusable'
    _run(tmp_path, workdir, '--config.train.n_steps=2', '--config.train.save_interval=2')
    (workdir / 'ckpts' / '2.ckpt' / 'optimizer.pth').write_bytes(b'truncated')
    proc = _run(tmp_path, workdir, '--config.train.n_steps=4', '--config.train.save_interval=2', check=False)
    assert proc.returncode != 0
    assert 'none can be resumed' in proc.stderr and 'move them away to start from step 0' in proc.stderr
    assert sorted(os.listdir(workdir / 'ckpts')) == ['2.ckpt']           # no silent restart from step 0
    assert [r['step'] for r in _records(workdir) if 'loss' in r] == [2]


def test_a_launch_whose_processes_do_not_see_each_other_is_refused(tmp_path):
    """use_cpu: true in a yaml does not reach the torchrun workers: without ACCELERATE_USE_CPU=1 both think they are
    alone. They must refuse before writing anything."""
    yaml = (ROOT / 'configs' / 'accelerate' / 'cpu_2proc.yaml').read_text().replace('use_cpu: false', 'use_cpu: true')
    (tmp_path / 'cpu.yaml').write_text(yaml)
    launcher = (sys.executable, '-m', 'accelerate.commands.accelerate_cli', 'launch', '--config_file',
                str(tmp_path / 'cpu.yaml'), '--main_process_port', '0')
    workdir = tmp_path / 'alone'
    proc = _run(tmp_path, workdir, '--config.train.n_steps=2', launcher=launcher, use_cpu=False, check=False)
    assert proc.returncode != 0
    assert 'the launcher started 2 processes (WORLD_SIZE=2) but accelerate runs 1' in proc.stderr
    assert 'ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu' in proc.stderr
    assert not workdir.exists()


def test_a_sharded_launch_on_cpu_processes_is_refused(tmp_path):
    """accelerate turns an FSDP launch of CPU processes into plain DDP without a word (with sync_module_states, its
    plugin fails first, asking for a GPU)."""
    launcher = (sys.executable, '-m', 'accelerate.commands.accelerate_cli', 'launch', '--config_file',
                str(ROOT / 'configs' / 'accelerate' / 'fsdp_shard_grad_op.yaml'), '--num_processes', '2',
                '--fsdp_sync_module_states', 'false', '--mixed_precision', 'no', '--main_process_port', '0')
    proc = _run(tmp_path, tmp_path / 'fsdp', '--config.train.n_steps=2', launcher=launcher, check=False)
    assert proc.returncode != 0
    assert 'the launch asks for FSDP (ACCELERATE_USE_FSDP=true) but accelerate runs MULTI_CPU' in proc.stderr


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """--config.compile=default: the training network compiled in place (checkpoint keys unchanged), losses of the
    eager run to float tolerance."""
    args = ('--config.train.n_steps=2', '--config.train.save_interval=2', '--config.train.fid_interval=0')
    _run(tmp_path, tmp_path / 'eager', *args)
    proc = _run(tmp_path, tmp_path / 'compiled', *args, '--config.compile=default')
    assert "compiling the network: torch.compile mode 'default', fullgraph=True" in proc.stderr + proc.stdout
    eager = [r['loss'] for r in _records(tmp_path / 'eager') if 'loss' in r]
    compiled = [r['loss'] for r in _records(tmp_path / 'compiled') if 'loss' in r]
    assert len(eager) == len(compiled) == 1 and compiled[0] == pytest.approx(eager[0], rel=1e-4)
    a, b = _state(tmp_path / 'eager', 2, 'nnet.pth'), _state(tmp_path / 'compiled', 2, 'nnet.pth')
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
