"""libs/training/preemption.py and the training loop's use of it, in this process with real signals (os.kill to
itself): the stop at the step reached with its checkpoint and exit code 75, a signal during a save, repeated signals,
timed checkpoints and their pruning, and the agreement of two gloo processes at check points only."""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import libs.training.state
from conftest import ROOT
from libs.config import load_config
from libs.training.checkpoint import INTERIM_FILE, FILES, list_checkpoints, load_checkpoint
from libs.training.data import TrainData
from libs.training.preemption import RESUME_EXIT_CODE, RunControl, StopSignals, StoppedEarly
from libs.training.trainer import train
from training_runs import same_tree


def _config(**train_keys):
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.nnet.attention_head_dim, config.nnet.num_layers = 32, 3
    config.sample.sample_steps = 2
    config.train.update(dict(batch_size=8, n_steps=8, log_interval=2, save_interval=4, eval_interval=1000,
                             fid_interval=0, keep_ckpts=None, grid_columns=1), **train_keys)
    return config


def _records(workdir):
    with open(workdir / 'log.jsonl') as f:
        return [json.loads(line) for line in f]


def _final_state(workdir, step):
    return load_checkpoint(str(workdir / 'ckpts' / f'{step}.ckpt'))


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'disabled')


def _signal_during_save(monkeypatch, at_step, signals):
    """Send `signals` to this process in the middle of the save of checkpoint `at_step` (after its first file)."""
    original = libs.training.state.write_files

    def write_files(folder, files):
        if f'.tmp-{at_step}-' not in folder:
            return original(folder, files)
        names = list(files)
        original(folder, {names[0]: files[names[0]]})
        for number in signals:
            os.kill(os.getpid(), number)
        original(folder, {name: files[name] for name in names[1:]})
    monkeypatch.setattr(libs.training.state, 'write_files', write_files)


def test_stop_signals_record_the_first_and_restore_the_handlers(capfd):
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(('SIGUSR1', 'SIGUSR2')) as signals:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert (signals.received, signals.repeats) == (signal.SIGUSR2, 1)
    assert signal.getsignal(signal.SIGUSR1) is before
    err = capfd.readouterr().err
    assert f'[pid {os.getpid()}] SIGUSR2 received: stopping after the step in progress' in err
    assert 'SIGUSR1 received again: already stopping, ignored' in err


def test_a_signal_during_a_save_stops_at_that_step_and_the_resumed_run_is_exact(tmp_path, monkeypatch, no_wandb):
    train(_config(), str(tmp_path / 'straight'))
    stopped = tmp_path / 'stopped'
    _signal_during_save(monkeypatch, 4, [signal.SIGTERM])
    with pytest.raises(StoppedEarly) as raised:
        train(_config(), str(stopped))
    assert raised.value.code == RESUME_EXIT_CODE == 75
    assert str(raised.value) == (f'stopped on SIGTERM at step 4 of 8: checkpoint {stopped}/ckpts/4.ckpt. Run the same '
                                 'command again to resume (exit code 75: stopped early, resume me)')
    assert [s for s, _ in list_checkpoints(str(stopped / 'ckpts'))] == [4]       # complete, no further step
    assert not os.path.exists(stopped / 'ckpts' / '4.ckpt' / INTERIM_FILE)      # a scheduled one
    assert _records(stopped)[-1] == {'step': 4, 'stopped_on_signal': 'SIGTERM'}
    assert max(r['step'] for r in _records(stopped) if 'loss' in r) == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                   # handlers restored

    monkeypatch.undo()
    train(_config(), str(stopped))
    for name in ('nnet.pth', 'nnet_ema.pth', 'optimizer.pth', 'rng.pth', 'lr_scheduler.pth'):
        assert same_tree(_final_state(tmp_path / 'straight', 8)[name], _final_state(stopped, 8)[name]), name


def test_repeated_signals_while_stopping_let_the_checkpoint_complete(tmp_path, monkeypatch, no_wandb, capfd):
    workdir = tmp_path / 'run'
    calls, next_batch = [0], TrainData.next_batch

    def next_batch_signalling(self, *args):                 # the first signal during step 3
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return next_batch(self, *args)
    monkeypatch.setattr(TrainData, 'next_batch', next_batch_signalling)
    _signal_during_save(monkeypatch, 3, [signal.SIGTERM, signal.SIGINT])
    with pytest.raises(StoppedEarly, match='stopped on SIGINT at step 3 of 8'):
        train(_config(), str(workdir))
    states = load_checkpoint(str(workdir / 'ckpts' / '3.ckpt'), [*FILES, INTERIM_FILE])
    assert states['step.pth'] == 3 and states[INTERIM_FILE] == {'reason': 'stop signal SIGINT'}
    err = capfd.readouterr().err
    assert err.count('received again: already stopping, ignored') == 2
    assert not [n for n in os.listdir(workdir / 'ckpts') if n.startswith('.')]


def test_timed_checkpoints_are_made_and_superseded(tmp_path, no_wandb):
    workdir = tmp_path / 'run'
    train(_config(n_steps=5, save_interval=5, save_every_minutes=1e-9), str(workdir))
    log = (workdir / 'output.log').read_text()
    for step in range(1, 5):                                # a timed save at every step boundary
        assert re.search(rf'saved checkpoint {workdir}/ckpts/{step}.ckpt \(\d+\.\d minutes since the last save\)',
                         log), step
    assert f'saved checkpoint {workdir}/ckpts/5.ckpt\n' in log
    assert os.listdir(workdir / 'ckpts') == ['5.ckpt']      # each superseded by the next one


def test_interim_checkpoints_do_not_count_in_keep_ckpts(tmp_path, no_wandb, monkeypatch):
    """keep_ckpts=1: the scheduled checkpoint 2 stays next to the newest interim one; both go once 4 is saved."""
    seen, prune = [], libs.training.state.TrainState.prune

    def recording_prune(self, *args, **kwargs):
        prune(self, *args, **kwargs)
        seen.append(sorted(os.listdir(self.ckpt_root)))
    monkeypatch.setattr(libs.training.state.TrainState, 'prune', recording_prune)
    train(_config(n_steps=4, save_interval=2, keep_ckpts=1, save_every_minutes=1e-9), str(tmp_path / 'run'))
    assert seen == [['1.ckpt'], ['2.ckpt'], ['2.ckpt', '3.ckpt'], ['4.ckpt']]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _agree(rank, port, results):
    """Process `rank` of 2: SIGUSR1 reaches process 1 only, during step 3; check points every 4 steps."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    with StopSignals(('SIGUSR1',)) as signals:
        control = RunControl(signals, 1e-9, torch.device('cpu'), is_main=rank == 0)
        decisions = []
        for step in range(1, 9):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            decision = control.poll(check_point=step % 4 == 0)
            decisions.append((decision.stop, decision.save_for_time))
    dist.destroy_process_group()
    results.put((rank, decisions))


def test_two_processes_agree_on_the_stop_step_and_the_timed_saves_at_check_points():
    results = mp.get_context('spawn').SimpleQueue()
    mp.spawn(_agree, args=(_free_port(), results), nprocs=2)
    decisions = dict(results.get() for _ in range(2))
    usr1 = int(signal.SIGUSR1)
    # nothing decided between check points (no collective there); at step 4 both stop, and both see process 0's
    # timer (process 1 has none of its own)
    expected = [(0, False)] * 3 + [(usr1, True)] + [(usr1, False)] * 3 + [(usr1, True)]
    assert decisions == {0: expected, 1: expected}


@pytest.mark.parametrize('ending', ['return', 'raise'])
def test_a_process_with_loader_workers_that_ignore_sigterm_exits_at_once(tmp_path, ending):
    """The workers ignore the stop signals; at the interpreter's exit, after a finished run or a crash, they are
    killed, not waited for, and nothing is reported about them."""
    script = tmp_path / 'draw_and_exit.py'
    script.write_text(f"""import sys
sys.path.insert(0, {str(ROOT)!r})
from libs.config import load_config
from libs.training.data import TrainData
config = load_config({str(ROOT / 'configs' / 'digits_DiM_tiny.py')!r})
config.train.update(dict(batch_size=8, num_workers=2))
batches = iter(TrainData(config, 'cpu').loader(0, 1, 0))     # alive until the interpreter's exit
x, y = next(batches)
print('drew', tuple(x.shape))
if {ending == 'raise'}:
    raise RuntimeError('a crash in the training loop')
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == (1 if ending == 'raise' else 0), proc.stderr
    assert 'drew (8, ' in proc.stdout
    assert 'DataLoader worker' not in proc.stderr and 'atexit' not in proc.stderr, proc.stderr
