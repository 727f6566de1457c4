"""Stopping a run gracefully on a signal, and saving on a timer, decided alike on every process.

Clusters stop jobs with a signal and a grace period before SIGKILL (SLURM: SIGTERM, or the one `--signal` names
ahead of the time limit; Kubernetes: SIGTERM). While `StopSignals` is active, each signal of
config.train.stop_signals (default SIGTERM, SIGINT, SIGUSR1; an empty list keeps Python's default actions) only
records that a stop was asked for; the training loop then finishes its step, writes a checkpoint of that step and
ends with exit code RESUME_EXIT_CODE (75, sysexits' EX_TEMPFAIL: "stopped early, run me again"). Later signals are
counted and ignored: the checkpoint being written is completed (and a kill in the middle of it leaves the previous
checkpoints intact, since checkpoints are committed by an atomic rename). DataLoader workers ignore these signals
(`ignore_in_worker`): a signal sent to the whole process group leaves the stop to the training process.

The final evaluation after the last step is not stopped this way: the handlers are restored before it (a signal then
has its default action; a killed evaluation continues from its written images when the run is resumed).

config.train.save_every_minutes (default None: off) adds a checkpoint at the first check point after that many
minutes since the last save, so that even a SIGKILL loses a bounded amount of work.

`RunControl.poll` makes the decision at step boundaries. With one process every step boundary is a check point and
nothing is exchanged. With several processes, the processes must stop at the same step, and a signal may reach only
one of them; they agree at check points only: every config.train.log_interval steps and at the steps that save or
evaluate, where the loop already waits for the device (the loss read back) or runs collectives. There one
all-reduce (MAX) of two integers (the signal received, if any; the main process's "time to save" from its clock)
gives every process the same answer; the other steps exchange nothing and read nothing back, so the stop comes at
most log_interval steps after the signal. Agreeing at every step would add a collective (and, on NCCL, a
device-to-host read) to each step; a side channel such as the launcher's key-value store cannot make processes
that run steps ahead of one another settle on one step without waiting for each other, which is what a collective
at a step they all reach does.
"""
import atexit
import logging
import multiprocessing.util     # registers multiprocessing's exit hook now, so that kill_workers_at_exit's runs first
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from libs.distributed import is_distributed

__all__ = ['RESUME_EXIT_CODE', 'STOP_SIGNALS', 'DEFAULT_STOP_SIGNALS', 'StoppedEarly', 'StopSignals', 'RunControl',
           'Decision', 'ignore_in_worker', 'kill_workers_at_exit', 'stop_signal_names']

log = logging.getLogger(__name__)

RESUME_EXIT_CODE = 75                       # os.EX_TEMPFAIL
STOP_SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1', 'SIGUSR2', 'SIGHUP', 'SIGQUIT')     # what config may name
DEFAULT_STOP_SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1')


def stop_signal_names(config):
    """config.train.stop_signals as a tuple of names (checked by libs.training.config)."""
    return tuple(config.train.get('stop_signals', DEFAULT_STOP_SIGNALS))


class StoppedEarly(SystemExit):
    """Raised by libs.training.trainer.train after a graceful stop; its exit code is RESUME_EXIT_CODE."""

    def __init__(self, message):
        super().__init__(RESUME_EXIT_CODE)
        self.message = message

    def __str__(self):
        return self.message


def ignore_in_worker(names, worker_id=None):
    """DataLoader `worker_init_fn` (with `functools.partial(ignore_in_worker, names)`): the stop signals ignored, so
    that a signal to the process group does not kill the workers under the training process. Call
    `kill_workers_at_exit` in the training process too."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def kill_workers_at_exit():
    """Make the interpreter's exit kill this process's daemonic children (DataLoader workers) still running.

    multiprocessing ends them at exit with SIGTERM and then waits for them; a worker that ignores SIGTERM
    (`ignore_in_worker`) would make that wait endless, after a finished run and after a crash alike. Exit hooks run
    in the reverse order of registration: this one, registered after multiprocessing's own (this module imports
    multiprocessing.util, which registers it), runs first. Calling it again registers the hook once."""
    atexit.unregister(_kill_daemonic_children)
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children():
    # torch's SIGCHLD handler raises for a worker ended by a signal: at exit that is the intent, not a failure
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


class StopSignals:
    """Context manager: while active, the signals `names` record a stop request (`received`: the first one's number,
    or None) instead of their default action; the previous handlers are restored on exit. Signals can only be
    handled in the main thread: elsewhere, nothing is installed (a warning says so)."""

    def __init__(self, names=DEFAULT_STOP_SIGNALS):
        self.names, self.received, self.repeats, self._saved = tuple(names), None, 0, {}

    def _handle(self, signum, frame):
        # Runs in the main thread between two bytecodes: record only, and report with one unbuffered write.
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            note = f'{name} received: stopping after the step in progress (a checkpoint of it will be written)'
        else:
            self.repeats += 1
            note = f'{name} received again: already stopping, ignored'
        try:
            os.write(2, f'[pid {os.getpid()}] {note}\n'.encode())
        except OSError:                                     # no stderr to tell: the stop goes on all the same
            pass

    def __enter__(self):
        if not self.names:
            return self
        try:
            for name in self.names:
                number = getattr(signal, name)
                self._saved[number] = signal.signal(number, self._handle)
        except ValueError:                                  # not the main thread
            self.restore()
            log.warning('stop signals %s not handled: the run is not in the main thread', ', '.join(self.names))
        return self

    def restore(self):
        """The previous handlers back (also on exit)."""
        for number, handler in self._saved.items():
            signal.signal(number, handler)
        self._saved = {}

    def __exit__(self, *exc):
        self.restore()
        return False


@dataclass
class Decision:
    """What a check point decided: `stop` is the number of the signal that asked for it (0: none)."""
    stop: int = 0
    save_for_time: bool = False

    @property
    def signal_name(self):
        return signal.Signals(self.stop).name if self.stop else None


class RunControl:
    """When the training loop stops and when it saves for time (see the module docstring); identical answers on
    every process. `signals`: an active StopSignals or None; `save_every_minutes`: None or 0 for no timed saves."""

    def __init__(self, signals, save_every_minutes, device, is_main):
        self.signals, self.device, self.is_main = signals, device, is_main
        self.period = 60.0 * save_every_minutes if save_every_minutes else None
        self.last_save = time.monotonic()
        self.stop = 0

    def saved(self):
        """A checkpoint was written: the timer starts again."""
        self.last_save = time.monotonic()

    def minutes_since_save(self):
        return (time.monotonic() - self.last_save) / 60

    def poll(self, check_point):
        """The decision at a step boundary. With several processes every process must call it with the same
        `check_point` (a collective there, nothing elsewhere); once a stop is decided it stays decided."""
        received = self.signals.received if self.signals is not None and self.signals.received else 0
        due = self.period is not None and self.is_main and time.monotonic() - self.last_save >= self.period
        if is_distributed():
            if not check_point:
                return Decision(self.stop)
            flags = torch.tensor([received, int(due)], dtype=torch.int32).to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            received, due = flags.tolist()
        if received and not self.stop:
            self.stop = received
        return Decision(self.stop, bool(due))
