"""Training checkpoints in the released layout, written atomically by one or several processes.

    <ckpt_root>/<step>.ckpt/{nnet, nnet_ema, optimizer, lr_scheduler, step, rng}.pth [+ optimizer.rank<r>.pth]

Every writer puts its files into one hidden staging folder `.tmp-<step>-<token>` and fsyncs them; when all writers
are done, process 0 renames the folder to `<step>.ckpt`. A folder named `<step>.ckpt` is therefore always complete;
a kill at any moment leaves at worst a staging folder, which is never read and is removed by the next save. A write
that fails (no space left, quota, permission, read-only filesystem) raises libs.files.WriteError naming the file
and the OS error; the caller removes the staging folder (`remove_path`) and no other checkpoint is touched.
`checkpoint_bytes` estimates what a set of files takes on disk, to compare with the free space before writing.

A checkpoint saved outside the save schedule (on a stop signal, or by config.train.save_every_minutes) holds
`interim.pth` ({'reason': str}) too: it is kept only until a newer checkpoint supersedes it (`is_interim`).

Reading uses `torch.load(weights_only=True, mmap=True)`: tensors stay on disk until used, so a process reads only
the parts it needs. A damaged folder (truncated, empty, foreign or missing file: named, with what is wrong) is skipped
and the previous one tried; a file that is intact but holds objects `weights_only` refuses, or checkpoints of which
none can be resumed, raise `CheckpointError`: a run never silently restarts from step 0 next to checkpoints it cannot
use.
"""
import logging
import os
import re
import shutil

import torch

from libs.files import UnreadableFile, load_torch_file, remove_path, writing

__all__ = ['FILES', 'INTERIM_FILE', 'CheckpointError', 'DamagedCheckpoint', 'save_checkpoint', 'staging_dir',
           'staging_path', 'write_files', 'commit', 'checkpoint_bytes', 'remove_stale_staging', 'is_interim',
           'list_checkpoints', 'read_file', 'load_checkpoint', 'latest_resumable', 'load_latest_checkpoint']

FILES = ('nnet.pth', 'nnet_ema.pth', 'optimizer.pth', 'lr_scheduler.pth', 'step.pth', 'rng.pth')
INTERIM_FILE = 'interim.pth'
_NAME = re.compile(r'^(\d+)\.ckpt$')
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be resumed: the run must stop rather than start over."""


class DamagedCheckpoint(Exception):
    """A checkpoint folder with a missing, truncated or unreadable file (skipped for an older one)."""


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_root):
    """[(step, path)] of the `<step>.ckpt` folders in `ckpt_root`, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_root, name))
             for name in os.listdir(ckpt_root) if (m := _NAME.match(name))]
    return sorted(found)


def is_interim(path):
    """Whether the checkpoint folder `path` was saved outside the save schedule (it holds INTERIM_FILE)."""
    return os.path.isfile(os.path.join(path, INTERIM_FILE))


# ------------------------------------------------------------------------------------------------ writing
def staging_path(ckpt_root, step, token):
    return os.path.join(ckpt_root, f'.tmp-{step}-{token}')


def staging_dir(ckpt_root, step, token):
    """The staging folder of checkpoint `step` for the save identified by `token` (created if missing)."""
    path = staging_path(ckpt_root, step, token)
    with writing(path):
        os.makedirs(path, exist_ok=True)
    return path


def write_files(folder, states):
    """torch.save each {file name: object} into `folder` and fsync it; WriteError (naming the file) if one fails.

    The files are written through Python file objects, so that an OS error (no space left...) reaches us as itself
    rather than as the C++ writer's "unexpected pos" message."""
    for name, obj in states.items():
        path = os.path.join(folder, name)
        with writing(path), open(path, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


# torch.save's zip archive: a record per tensor storage (local and central headers, its name, padding to 64 bytes,
# its share of the pickled structure: about 150 bytes measured) and per file (about 1.3 KB); 512 bytes and 16 KiB
# bound them from above.
_PER_STORAGE, _PER_FILE = 512, 1 << 14


def checkpoint_bytes(states):
    """Upper estimate of the bytes torch.save takes for {file name: object} (every tensor storage once)."""
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes() + _PER_STORAGE
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(k)
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif isinstance(obj, (str, bytes)):
            total += len(obj)

    for obj in states.values():
        walk(obj)
        total += _PER_FILE
    return total


def remove_stale_staging(ckpt_root, token):
    """Remove the staging folders of saves other than `token`'s (only safe while this run holds the workdir's
    lock: they were left by interrupted runs); returns their names."""
    stale = [name for name in (os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else [])
             if name.startswith(('.tmp-', '.old-')) and not name.endswith(f'-{token}')]
    for name in stale:
        remove_path(os.path.join(ckpt_root, name))
    return stale


def commit(ckpt_root, step, token, keep=None, expect=()):
    """Rename the complete staging folder of `step` to `<step>.ckpt` (process 0 only, after every writer is done).

    `expect` names the files besides FILES that must be there (the per-process optimizer shards). Keeps the newest
    `keep` checkpoints and removes the leftovers of interrupted saves.
    """
    tmp = os.path.join(ckpt_root, f'.tmp-{step}-{token}')
    missing = [f for f in (*FILES, *expect) if not os.path.isfile(os.path.join(tmp, f))]
    if missing:
        raise RuntimeError(f"checkpoint {step}: the staging folder {tmp} lacks {missing}; not committed")
    final = os.path.join(ckpt_root, f'{step}.ckpt')
    with writing(final):
        _fsync(tmp)
        if os.path.exists(final):                   # re-saving a step: move the old one aside first
            old = os.path.join(ckpt_root, f'.old-{step}-{token}')
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)              # the old one back: a failed save leaves it as it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(ckpt_root)
    _prune(ckpt_root, keep, current=final, token=token)
    return final


def save_checkpoint(ckpt_root, step, states, keep=None):
    """Single writer: `states` ({file name: object}, at least FILES) as `<step>.ckpt`; keep the newest `keep`."""
    if not set(FILES) <= set(states):
        raise ValueError(f"a checkpoint holds at least {FILES}, got {sorted(states)}")
    os.makedirs(ckpt_root, exist_ok=True)
    token = f'{os.getpid()}'
    tmp = staging_path(ckpt_root, step, token)
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp, cleanup=[tmp]):
        write_files(staging_dir(ckpt_root, step, token), states)
        return commit(ckpt_root, step, token, keep, expect=[f for f in states if f not in FILES])


def _prune(ckpt_root, keep, current, token):
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for name in os.listdir(ckpt_root):              # leftovers of interrupted saves
        if name.startswith(('.tmp-', '.old-')) and not name.endswith(f'-{token}'):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    if keep is None:
        return
    for _, path in list_checkpoints(ckpt_root)[:-keep]:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ reading
def read_file(folder, name):
    """One checkpoint file, memory-mapped, `weights_only=True`.

    Raises DamagedCheckpoint for a missing or unreadable file (naming it and what is wrong: empty, truncated, not a
    torch file), CheckpointError for an intact archive that holds objects `weights_only` refuses (a format problem
    that would recur in every checkpoint of the run).
    """
    path = os.path.join(folder, name)
    try:
        return load_torch_file(path, mmap=True)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path}: missing") from None
    except UnreadableFile as e:
        if e.problem.startswith('holds objects'):
            raise CheckpointError(f"{e}; it was written by an incompatible version of this code and cannot be "
                                  "resumed") from None
        raise DamagedCheckpoint(str(e)) from None


def load_checkpoint(folder, names=FILES):
    """{name: object} of the given files of one checkpoint folder; checks that step.pth matches the folder name."""
    states = {name: read_file(folder, name) for name in names}
    if 'step.pth' in states:
        m = _NAME.match(os.path.basename(folder.rstrip('/')))
        if m is None or int(states['step.pth']) != int(m.group(1)):
            raise DamagedCheckpoint(f"{folder}: its step.pth says {states['step.pth']}")
    return states


def latest_resumable(ckpt_root, open_fn, agree=lambda step: step):
    """(step, states) of the newest checkpoint that `open_fn(path)` opens, or (0, None) if there is none.

    `open_fn` raises DamagedCheckpoint to skip a folder. With several processes, `agree(step)` returns the step
    every process can resume (the smallest of their choices); each process then opens that one.
    Raises CheckpointError when checkpoints exist but none can be resumed.
    """
    ckpts = list_checkpoints(ckpt_root)
    problems, mine, states = [], 0, None
    for step, path in reversed(ckpts):
        try:
            states, mine = open_fn(path), step
            break
        except DamagedCheckpoint as e:
            log.warning('skipping unreadable checkpoint %s: %s', path, e)
            problems.append(str(e))
    agreed = agree(mine)
    if agreed != mine:
        states = None
        if agreed:
            try:
                states = open_fn(dict(ckpts)[agreed])
            except DamagedCheckpoint as e:
                problems.append(str(e))
                agreed = 0
    if ckpts and not agreed:
        raise CheckpointError(
            f"{len(ckpts)} checkpoint(s) in {ckpt_root} but none can be resumed: {'; '.join(problems[:4])}. "
            "Repair them, or move them away to start from step 0.")
    return agreed, states


def load_latest_checkpoint(ckpt_root, names=FILES):
    """Single process: (step, {file: object}) of the newest checkpoint that loads, or (0, None) if there is none."""
    return latest_resumable(ckpt_root, lambda path: load_checkpoint(path, names))
