"""Test helper: a small filesystem that fills up for real (a tmpfs, where this process may mount one: root in a
container that allows it, as on the development and CI machines), or, where it may not, a simulation that makes
writes through Python file objects raise ENOSPC past a byte budget."""
import contextlib
import errno
import io
import os
import subprocess

import pytest


def can_mount():
    """Whether this process can mount a tmpfs (checked once, by trying)."""
    if not hasattr(can_mount, 'answer'):
        probe = f'/tmp/dim-tmpfs-probe-{os.getpid()}'
        os.makedirs(probe, exist_ok=True)
        can_mount.answer = _mount(probe, 1 << 20)
        if can_mount.answer:
            _unmount(probe)
        os.rmdir(probe)
    return can_mount.answer


def _mount(path, size):
    return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True).returncode == 0


def _unmount(path):
    subprocess.run(['umount', '-l', str(path)], capture_output=True, check=True)


@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of `size` bytes mounted at `path` (created) for the block; skips the test where mounting is not
    allowed."""
    if not can_mount():
        pytest.skip('this process may not mount a tmpfs (the ENOSPC simulation tests cover the logic)')
    os.makedirs(path, exist_ok=True)
    assert _mount(path, size)
    try:
        yield path
    finally:
        _unmount(path)


def remount_read_only(path):
    subprocess.run(['mount', '-o', 'remount,ro', str(path)], capture_output=True, check=True)


def fill(folder, leave):
    """Write a file into `folder` that leaves `leave` bytes free on its filesystem; its path."""
    path = os.path.join(folder, 'filler')
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(path, 'wb') as f:
        f.write(b'\0' * max(0, free - leave))
    return path


class _FullFile(io.FileIO):
    """A file that raises ENOSPC once `budget[0]` bytes have been written through any _FullFile."""

    def __init__(self, path, mode, budget):
        super().__init__(path, mode.replace('b', '') or 'r')
        self.budget = budget

    def write(self, data):
        size = len(memoryview(data).cast('B'))
        if 'w' in self.mode or 'a' in self.mode:
            if size > self.budget[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.budget[0] -= size
        return super().write(data)


def simulate_full_disk(monkeypatch, module, budget):
    """Binary writes opened with `open` in `module` fail with ENOSPC once `budget` bytes are written."""
    left = [budget]

    def full_open(path, mode='r', *args, **kwargs):
        if 'b' in mode and ('w' in mode or 'a' in mode):
            return _FullFile(path, mode, left)
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(module, 'open', full_open, raising=False)
