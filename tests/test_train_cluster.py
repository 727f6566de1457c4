"""train_ldm_discrete.py under what clusters do to a job, in real processes: SIGTERM (to one process and its
DataLoader worker, and to one of two gloo processes), timed checkpoints and a SIGKILL, a second run on the same
workdir, and a full disk (a real tmpfs where the test may mount one)."""
import os
import re
import signal
import socket
import time

import psutil
import pytest

from libs.files import FolderLock
from libs.training.checkpoint import FILES, load_checkpoint
from small_disk import tmpfs
from training_runs import (CPU_LAUNCH, checkpoint_steps, kill_tree, logged_step, records, run, same_tree, start,
                           state, wait_until)

STEPS = ['--config.train.n_steps=12', '--config.train.save_interval=6', '--config.train.fid_interval=0']
COMPARED = ('nnet.pth', 'nnet_ema.pth', 'optimizer.pth', 'rng.pth', 'lr_scheduler.pth')
STOPPED = re.compile(r'stopped on (SIG\w+) at step (\d+) of 12: checkpoint (\S+)\. Run the same command again to '
                     r'resume \(exit code 75: stopped early, resume me\)')


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """An uninterrupted one-process run of STEPS."""
    tmp = tmp_path_factory.mktemp('straight')
    run(tmp, tmp / 'run', *STEPS)
    return tmp / 'run'


def _same_end(a, b, step=12):
    for name in COMPARED:
        assert same_tree(state(a, step, name), state(b, step, name)), name


@pytest.mark.slow
def test_sigterm_stops_at_the_step_reached_and_the_resumed_run_is_exact(tmp_path, straight):
    workdir = tmp_path / 'stopped'
    proc, log = start(tmp_path, workdir, *STEPS, '--config.train.num_workers=1', session=True)
    wait_until(lambda: logged_step(workdir) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)                # the process and its DataLoader worker, as a cluster does
    assert proc.wait(timeout=300) == 75
    name, step, path = STOPPED.search(log.read_text()).groups()
    step = int(step)
    assert name == 'SIGTERM' and 2 <= step < 12 and path == f'{workdir}/ckpts/{step}.ckpt'
    assert checkpoint_steps(workdir)[-1] == step
    assert load_checkpoint(path)['step.pth'] == step
    assert records(workdir)[-1] == {'step': step, 'stopped_on_signal': 'SIGTERM'}

    resumed = run(tmp_path, workdir, *STEPS)
    assert f'resumed from {workdir}/ckpts/{step}.ckpt' in resumed.stderr
    _same_end(straight, workdir)
    assert checkpoint_steps(workdir) == [6, 12]                       # the stop's checkpoint superseded


def _worker(launcher_pid, rank):
    """The training process of `rank` among the launcher's descendants."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get('RANK') == str(rank) and 'train_ldm_discrete.py' in ' '.join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    run(tmp_path, tmp_path / 'straight', *STEPS, launcher=CPU_LAUNCH)
    workdir = tmp_path / 'stopped'
    proc, log = start(tmp_path, workdir, *STEPS, launcher=CPU_LAUNCH)
    wait_until(lambda: _worker(proc.pid, 1) is not None, proc)
    worker = _worker(proc.pid, 1)                       # not the main process
    wait_until(lambda: logged_step(workdir) >= 2, proc)
    worker.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out = log.read_text()
    name, step, _ = STOPPED.search(out).groups()
    step = int(step)
    assert name == 'SIGTERM' and step % 2 == 0 and step < 12           # a check point: a log step (log_interval=2)
    # torchrun reports each worker's exit code and exits 1 itself. The first worker to exit 75 makes it end the
    # other one with SIGTERM (-15) if that one is still tearing down, after the checkpoint was complete.
    codes = dict(re.findall(r'rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)', out))
    assert '75' in codes.values() and set(codes.values()) <= {'75', '-15'}, out[-3000:]
    assert checkpoint_steps(workdir)[-1] == step
    assert state(workdir, step, 'rng.pth')['world_size'] == 2

    resumed = run(tmp_path, workdir, *STEPS, launcher=CPU_LAUNCH)
    assert f'resumed from {workdir}/ckpts/{step}.ckpt' in resumed.stderr
    _same_end(tmp_path / 'straight', workdir)


@pytest.mark.slow
def test_timed_checkpoints_bound_what_a_sigkill_loses(tmp_path, straight):
    workdir = tmp_path / 'killed'
    # a period far below a step's time: a timed checkpoint at every check point outside the schedule (steps 2, 4, 8, 10)
    proc, _ = start(tmp_path, workdir, *STEPS, '--config.train.save_every_minutes=0.0001')

    def newest_is_timed():
        steps = checkpoint_steps(workdir) if (workdir / 'ckpts').is_dir() else []
        return bool(steps) and steps[-1] % 6 != 0

    # checked while the run is frozen, so that it cannot move past that state between the check and the kill
    wait_until(lambda: _frozen_if(newest_is_timed, proc), proc)
    kill_tree(proc.pid)
    proc.wait()
    newest = checkpoint_steps(workdir)[-1]
    assert 0 < newest < 12 and newest % 6, newest                     # a timed one, outside the schedule
    assert load_checkpoint(str(workdir / 'ckpts' / f'{newest}.ckpt'))['step.pth'] == newest

    resumed = run(tmp_path, workdir, *STEPS)
    assert f'resumed from {workdir}/ckpts/{newest}.ckpt' in resumed.stderr
    _same_end(straight, workdir)


def _frozen_if(condition, proc):
    """Stop the process with SIGSTOP and check `condition()`; leave it stopped if it holds, else resume it."""
    process = psutil.Process(proc.pid)
    process.suspend()
    while process.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
        time.sleep(0.001)
    if condition():
        return True
    process.resume()
    return False


def test_a_second_run_on_a_held_workdir_is_refused_before_writing(tmp_path):
    workdir = tmp_path / 'busy'
    with FolderLock(workdir, 'training run'):
        proc = run(tmp_path, workdir, '--config.train.n_steps=2', check=False)
    assert proc.returncode == 1
    assert (f'{workdir} is in use by a training run on host {socket.gethostname()}, pid {os.getpid()}, started '
            in proc.stderr), proc.stderr[-2000:]
    assert f'lock file {workdir}/run.lock. Wait for that run to end or stop it, or use another folder' in proc.stderr
    assert os.listdir(workdir) == ['run.lock']                        # nothing written


@pytest.mark.slow
def test_two_runs_started_on_one_workdir(tmp_path):
    workdir, steps = tmp_path / 'shared', ['--config.train.n_steps=2000', '--config.train.save_interval=10',
                                           '--config.train.fid_interval=0']
    first, _ = start(tmp_path, workdir, *steps)
    wait_until(lambda: logged_step(workdir) >= 2, first)
    second = run(tmp_path, workdir, *steps, check=False)
    assert second.returncode == 1 and f'pid {first.pid}, started ' in second.stderr, second.stderr[-2000:]
    assert first.poll() is None                                       # the first run goes on, unharmed
    wait_until(lambda: logged_step(workdir) >= 12, first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 75
    steps_logged = [r['step'] for r in records(workdir) if 'loss' in r]
    assert steps_logged == list(range(2, steps_logged[-1] + 1, 2))    # one run's records, each once
    newest = checkpoint_steps(workdir)[-1]
    assert newest >= 12 and load_checkpoint(str(workdir / 'ckpts' / f'{newest}.ckpt'))['step.pth'] == newest


def test_a_full_disk_stops_the_run_before_writing_and_keeps_the_last_checkpoint(tmp_path):
    with tmpfs(tmp_path / 'disk', 1600 << 10) as disk:
        workdir = disk / 'run'
        proc = run(tmp_path, workdir, '--config.train.n_steps=4', '--config.train.save_interval=2',
                   '--config.train.fid_interval=0', '--config.train.keep_ckpts=1', check=False)
        assert proc.returncode == 1
        assert re.search(rf'checkpoint 4 not saved: checkpoint 4 \(all its files\) needs about [\d.]+ MB \([\d,]+ '
                         rf'bytes\) but {workdir}/ckpts has [\d.]+ KB \([\d,]+ bytes\) free: free some space '
                         rf'\(or write elsewhere\)\. Nothing of it is left on disk; the earlier checkpoints in '
                         rf'{workdir}/ckpts \(\[2\]\) are untouched', proc.stderr), proc.stderr[-3000:]
        assert os.listdir(workdir / 'ckpts') == ['2.ckpt']            # no staging folder left
        assert load_checkpoint(str(workdir / 'ckpts' / '2.ckpt'), FILES)['step.pth'] == 2
