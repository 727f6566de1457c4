"""libs/files.py: unreadable files named with what is wrong, writes that check the free space and name the file and
the OS error when they fail (on a real full tmpfs where the test may mount one, else a simulated ENOSPC), atomic
JSON, and the folder lock between real processes."""
import datetime
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import libs.files
from conftest import ROOT
from libs.files import (LOCK_NAME, FolderInUse, FolderLock, NotEnoughSpace, UnreadableFile, WriteError,
                        check_free_space, load_npz, load_torch_file, write_json, writing)
from small_disk import fill, remount_read_only, simulate_full_disk, tmpfs


@pytest.fixture
def torch_file(tmp_path):
    path = tmp_path / 'weights.pth'
    torch.save({'w': torch.randn(1000)}, path)
    return path


@pytest.mark.parametrize('damage, problem', [
    (lambda b: b[:len(b) // 2], r'is truncated \(\d[\d,]* bytes; the end of its zip archive is missing\)'),
    (lambda b: b'', r'is empty \(0 bytes\), not a torch file'),
    (lambda b: b'{"not": "torch"}', r"is not a torch file \(it starts with b'\{\"not\": ', 16 bytes\)"),
])
def test_unreadable_torch_files_are_named_with_the_problem(torch_file, damage, problem):
    torch_file.write_bytes(damage(torch_file.read_bytes()))
    with pytest.raises(UnreadableFile, match=f'^{torch_file}: {problem}'):
        load_torch_file(torch_file)


def test_a_numpy_file_or_a_folder_is_not_taken_for_a_torch_file(tmp_path):
    np.save(tmp_path / 'a.npy', np.zeros(3))
    with pytest.raises(UnreadableFile, match=r'a.npy: is a numpy .npy array file, not a torch file'):
        load_torch_file(tmp_path / 'a.npy')
    with pytest.raises(UnreadableFile, match=f'{tmp_path}: is a folder, not a torch file'):
        load_torch_file(tmp_path)
    with pytest.raises(FileNotFoundError, match='missing.pth: no such file'):
        load_torch_file(tmp_path / 'missing.pth')


def test_objects_weights_only_refuses_are_named(tmp_path):
    torch.save({'when': datetime.date(2026, 1, 1)}, tmp_path / 'pickled.pth')   # an object, not tensors
    with pytest.raises(UnreadableFile, match=r'pickled.pth: holds objects that torch.load\(weights_only=True\) '
                                             r'refuses'):
        load_torch_file(tmp_path / 'pickled.pth')


def test_unreadable_npz_files_are_named(tmp_path):
    path = tmp_path / 'stats.npz'
    np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UnreadableFile, match=r'stats.npz: is truncated .* the end of its zip archive is missing'):
        with load_npz(path) as f:
            f['mu']
    path.write_bytes(b'mu,sigma\n1,2\n')
    with pytest.raises(UnreadableFile, match=r"stats.npz: is not an .npz archive \(it starts with b'mu,sigma'"):
        with load_npz(path):
            pass
    np.save(tmp_path / 'single.npy', np.zeros(2))
    with pytest.raises(UnreadableFile, match='single.npy: is a single .npy array, not an .npz archive'):
        with load_npz(tmp_path / 'single.npy'):
            pass


def test_free_space_is_checked_against_an_estimate(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    check_free_space(tmp_path, 1000, 'a small file')
    with pytest.raises(NotEnoughSpace, match=rf'a big file needs about .* \({free * 2:,} bytes\) but {tmp_path} has '
                                             r'.* free: free some space') as raised:
        check_free_space(tmp_path, free * 2, 'a big file')
    assert raised.value.errno == errno.ENOSPC


def test_a_failed_write_names_the_file_and_removes_its_leftovers(tmp_path, monkeypatch):
    simulate_full_disk(monkeypatch, sys.modules[__name__], budget=100)
    tmp, target = tmp_path / 'part.tmp', tmp_path / 'data.pth'
    with pytest.raises(WriteError, match=rf'^cannot write {target}: No space left on device \(the filesystem is '
                                         rf'full; .* free in {tmp_path}\)$'):
        with writing(target, cleanup=[tmp]):
            with open(tmp, 'wb') as f:                                     # torch's C++ writer hides the OS error
                torch.save({'w': torch.zeros(1000)}, f)
    assert not tmp.exists()


def test_write_json_on_a_full_tmpfs_keeps_the_old_file(tmp_path, monkeypatch):
    with tmpfs(tmp_path / 'disk', 256 << 10) as disk:
        path = disk / 'best.json'
        write_json(path, {'best': 1})
        fill(disk, leave=2048)
        with pytest.raises(NotEnoughSpace, match=rf'{path} needs about .* but {disk} has .* free'):
            write_json(path, {'history': list(range(2000))})
        os.remove(disk / 'filler')

        def check_then_fill(*args):                          # the disk fills between the check and the write
            check_free_space(*args)
            fill(disk, leave=0)
        monkeypatch.setattr(libs.files, 'check_free_space', check_then_fill)
        with pytest.raises(WriteError, match=rf'cannot write {path}: No space left on device \(the filesystem is '
                                             rf'full; 0 bytes free in {disk}\)'):
            write_json(path, {'x': 1})
        assert json.loads(path.read_text()) == {'best': 1} and sorted(os.listdir(disk)) == ['best.json', 'filler']
        monkeypatch.undo()
        os.remove(disk / 'filler')
        remount_read_only(disk)
        with pytest.raises(WriteError, match=rf'cannot write {path}: Read-only file system \(the filesystem is '
                                             r'read-only\)'):
            write_json(path, {'x': 2})


HOLDER = '''
import sys, time
sys.path.insert(0, {root!r})
from libs.files import FolderLock
lock = FolderLock({folder!r}, 'test holder').acquire()
print('held', flush=True)
time.sleep(600)
'''


def _hold_in_another_process(folder):
    proc = subprocess.Popen([sys.executable, '-c', HOLDER.format(root=str(ROOT), folder=str(folder))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'held'
    return proc


def test_a_locked_folder_is_refused_naming_the_holder_until_it_dies(tmp_path):
    holder = _hold_in_another_process(tmp_path)
    try:
        with pytest.raises(FolderInUse, match=rf'{tmp_path} is in use by a test holder on host '
                                              rf'{socket.gethostname()}, pid {holder.pid}, started 20\d\d-.*\(-c\); '
                                              rf'lock file {tmp_path}/{LOCK_NAME}'):
            FolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)                                 # a crash: the OS releases the lock
        holder.wait()
    with FolderLock(tmp_path, 'second run') as lock:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert (info['pid'], info['what']) == (os.getpid(), 'second run')
        with pytest.raises(FolderInUse, match='already in use by this process'):
            FolderLock(tmp_path).acquire()
    assert lock.fd is None and not libs.files._HELD
    FolderLock(tmp_path).acquire().release()
