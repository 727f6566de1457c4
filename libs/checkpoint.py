"""Training checkpoints in the released layout, written atomically.

    <ckpt_root>/<step>.ckpt/{nnet, nnet_ema, optimizer, lr_scheduler, step, rng}.pth

Each checkpoint is written into a hidden temporary folder, flushed to disk, then renamed into place,
so a folder named `<step>.ckpt` is always complete; a kill at any moment leaves at worst a
`.tmp-*` folder, which is never read and is cleaned up by the next save.
"""
import logging
import os
import re
import shutil

import torch

__all__ = ['FILES', 'save_checkpoint', 'list_checkpoints', 'load_latest_checkpoint']

FILES = ('nnet.pth', 'nnet_ema.pth', 'optimizer.pth', 'lr_scheduler.pth', 'step.pth', 'rng.pth')
_NAME = re.compile(r'^(\d+)\.ckpt$')
log = logging.getLogger(__name__)


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


def save_checkpoint(ckpt_root, step, states, keep=None):
    """Write `states` ({file name: object}, exactly FILES) as `<step>.ckpt`; keep the newest `keep` folders."""
    if sorted(states) != sorted(FILES):
        raise ValueError(f"a checkpoint holds exactly {FILES}, got {sorted(states)}")
    os.makedirs(ckpt_root, exist_ok=True)
    tmp = os.path.join(ckpt_root, f'.tmp-{step}-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, obj in states.items():
        torch.save(obj, os.path.join(tmp, name))
        _fsync(os.path.join(tmp, name))
    _fsync(tmp)
    final = os.path.join(ckpt_root, f'{step}.ckpt')
    if os.path.exists(final):                       # re-saving a step: move the old one aside first
        old = os.path.join(ckpt_root, f'.old-{step}-{os.getpid()}')
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(ckpt_root)
    _prune(ckpt_root, keep, current=final)
    return final


def _prune(ckpt_root, keep, current):
    for name in os.listdir(ckpt_root):              # leftovers of interrupted saves
        path = os.path.join(ckpt_root, name)
        if name.startswith(('.tmp-', '.old-')) and not name.endswith(f'-{os.getpid()}'):
            shutil.rmtree(path, ignore_errors=True)
    if keep is None:
        return
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    ckpts = [path for _, path in list_checkpoints(ckpt_root)]
    for path in ckpts[:-keep]:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)


def _load(path):
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"missing {missing}")
    return {f: torch.load(os.path.join(path, f), map_location='cpu', weights_only=True) for f in FILES}


def load_latest_checkpoint(ckpt_root):
    """(step, {file: object}) of the newest checkpoint that loads, or (0, None).

    A corrupt or incomplete folder is skipped with a warning, and the previous one is tried.
    """
    for step, path in reversed(list_checkpoints(ckpt_root)):
        try:
            states = _load(path)
        except Exception as e:          # truncated file, bad pickle, missing file
            log.warning('skipping unreadable checkpoint %s: %s', path, e)
            continue
        if int(states['step.pth']) != step:
            log.warning('skipping checkpoint %s: its step.pth says %s', path, states['step.pth'])
            continue
        return step, states
    return 0, None
