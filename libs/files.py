"""Files a run reads and writes.

- Reading: every missing input reported at once (`FileChecks`); a file that exists but cannot be read raises
  `UnreadableFile` naming it and what is wrong with it (empty, truncated, not a torch / numpy file, objects
  `weights_only` refuses), never the reading library's bare error (`load_torch_file`, `load_npz`).
- Writing: `check_free_space` compares an estimated size with the free space before a large write; `writing(path)`
  turns an OS error of a write into `WriteError`, which names the file, the OS error (no space left, disk quota,
  permission, read-only filesystem) and the free space, after removing what the failed write left; `write_json`
  writes atomically with both.
- `FolderLock`: one run per folder, an OS file lock on `<folder>/run.lock`.
- `file_sha256`: content hashes.
"""
import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
import sys
import time
import zipfile

__all__ = ['FileChecks', 'UnreadableFile', 'load_torch_file', 'load_npz', 'WriteError', 'NotEnoughSpace',
           'check_free_space', 'writing', 'remove_path', 'write_json', 'FolderLock', 'FolderInUse', 'LOCK_NAME',
           'file_sha256', 'format_bytes']


class FileChecks:
    """Calls loaders, collecting their FileNotFoundErrors (which name the file and its source) to report at once:

        load = FileChecks()
        nnet = load(load_network, config, path)
        reference = load(load_reference, stats_path)
        load.raise_if_missing()
    """

    def __init__(self):
        self.missing = []

    def __call__(self, loader, *args, **kwargs):
        try:
            return loader(*args, **kwargs)
        except FileNotFoundError as e:
            self.missing.append(str(e))

    def raise_if_missing(self):
        if self.missing:
            raise FileNotFoundError('\n'.join(self.missing))


def file_sha256(path, chunk=1 << 24):
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def format_bytes(n):
    """'1.2 MB (1,185,088 bytes)'."""
    for unit, size in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
        if n >= size:
            return f'{n / size:.1f} {unit} ({n:,} bytes)'
    return f'{n:,} bytes'


# ------------------------------------------------------------------------------------------------ reading
class UnreadableFile(ValueError):
    """A file that exists but cannot be read as what it should be; the message names it and the problem."""

    def __init__(self, path, problem):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f'{self.path}: {problem}')


_ZIP_START, _ZIP_END = b'PK\x03\x04', b'PK\x05\x06'
_NPY_START = b'\x93NUMPY'


def _diagnose(path, error, expected):
    """What is wrong with the unreadable file `path` (`error`: what the reader raised; `expected`: the format)."""
    if os.path.isdir(path):
        return f'is a folder, not {expected}'
    size = os.path.getsize(path)
    if size == 0:
        return f'is empty (0 bytes), not {expected}'
    with open(path, 'rb') as f:
        head = f.read(8)
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
    if head.startswith(_ZIP_START):
        if _ZIP_END not in tail:
            return f'is truncated ({size:,} bytes; the end of its zip archive is missing): {expected} cut short'
        return f'is a damaged zip archive ({size:,} bytes), not readable as {expected}: {_first_line(error)}'
    if head.startswith(_NPY_START):
        return f'is a numpy .npy array file, not {expected}' if expected != 'a .npy file' else \
            f'is truncated or damaged ({size:,} bytes): {_first_line(error)}'
    if head[:1] == b'\x80' and expected == 'a torch file':          # torch's legacy (pre-zip) format
        return f'is truncated or damaged ({size:,} bytes, legacy torch format): {_first_line(error)}'
    return f'is not {expected} (it starts with {head!r}, {size:,} bytes)'


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _starts_like_torch(path):
    """A zip archive (torch's format) or a pickle (its legacy one)."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head.startswith(_ZIP_START) or head[:1] == b'\x80'


def load_torch_file(path, mmap=False):
    """`torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)`.

    Raises FileNotFoundError for a missing file, UnreadableFile for one that is empty, truncated, not a torch file,
    or holds objects `weights_only` refuses (`problem` then starts with 'holds objects').
    """
    import torch
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such file')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e) and _starts_like_torch(path):
            first = next((line for line in str(e).splitlines() if 'GLOBAL' in line or 'Unsupported' in line), '')
            raise UnreadableFile(path, f'holds objects that torch.load(weights_only=True) refuses '
                                       f'({first.strip()})') from None
        raise UnreadableFile(path, _diagnose(path, e, 'a torch file')) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise UnreadableFile(path, _diagnose(path, e, 'a torch file')) from None


@contextlib.contextmanager
def load_npz(path, allow_pickle=False):
    """`with load_npz(path) as f:` the open `np.load` archive; UnreadableFile for a file numpy cannot open, and for
    an array of it that cannot be read (`f[name]` inside the block)."""
    import numpy as np
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such file')
    try:
        archive = np.load(path, allow_pickle=allow_pickle)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise UnreadableFile(path, _diagnose(path, e, 'an .npz archive')) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UnreadableFile(path, 'is a single .npy array, not an .npz archive')
    try:
        with archive:
            yield archive
    except UnreadableFile:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise UnreadableFile(path, f'is damaged: {_first_line(e)}') from None
    except ValueError as e:                          # numpy's "cannot reshape array of size ..." of a cut array
        raise UnreadableFile(path, f'is truncated or damaged: {_first_line(e)}') from None


# ------------------------------------------------------------------------------------------------ writing
_HINTS = {errno.ENOSPC: 'the filesystem is full', errno.EDQUOT: 'the disk quota is used up',
          errno.EROFS: 'the filesystem is read-only', errno.EACCES: 'no permission to write there',
          errno.EPERM: 'the operation is not permitted there'}


class WriteError(OSError):
    """A write that failed: names the file, the OS error and the free space of its folder."""

    @classmethod
    def of(cls, path, error):
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        code = getattr(error, 'errno', None)
        hint = _HINTS.get(code)
        if code in (errno.ENOSPC, errno.EDQUOT):
            hint += f'; {_free_space(folder)} free in {folder}'
        text = error.strerror or str(error)
        return cls(code, f'cannot write {path}: {text}' + (f' ({hint})' if hint else ''))

    def __str__(self):
        return self.strerror


class NotEnoughSpace(WriteError):
    """An estimated write does not fit the free space: names both numbers and the folder."""


def _free_space(folder):
    try:
        return format_bytes(shutil.disk_usage(folder).free)
    except OSError:
        return 'unknown space'


def check_free_space(folder, need, what):
    """Raise NotEnoughSpace if `need` bytes (the estimated size of `what`) exceed the space free to this user in
    `folder` (which must exist). Quotas are not seen here: a write over quota fails as a WriteError."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise NotEnoughSpace(errno.ENOSPC, f'{what} needs about {format_bytes(need)} but {os.path.abspath(folder)} '
                                           f'has {format_bytes(free)} free: free some space (or write elsewhere)')


def _os_error_in(error):
    """The OSError an exception is or was raised while handling (torch's C++ writer reports a failed Python file
    write as a RuntimeError whose context is the OSError), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def remove_path(path):
    """Remove a file or a folder tree if there is one (cleaning up after a failed write: best effort, no error)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def writing(path, cleanup=()):
    """Around a write of `path`: on any error the paths in `cleanup` (temporary files or folders) are removed, and
    an OS error (also one reported through a library's own exception) is raised as WriteError naming `path`."""
    try:
        yield
    except BaseException as e:
        for leftover in cleanup:
            remove_path(leftover)
        os_error = _os_error_in(e)
        if os_error is None or isinstance(e, WriteError):
            raise
        raise WriteError.of(path, os_error) from None


def write_json(path, obj):
    """JSON file written atomically (a temporary file renamed over `path`), after checking it fits the free space;
    a failed write removes the temporary file and raises WriteError."""
    text = json.dumps(obj, indent=2)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f'{path}.{os.getpid()}.tmp'
    with writing(path, cleanup=[tmp]):
        check_free_space(folder, len(text.encode()) + 4096, path)
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ one run per folder
LOCK_NAME = 'run.lock'
_HELD = {}                      # lock file (real path) -> FolderLock held by this process


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive OS lock on `<folder>/run.lock` (`flock`), so that one run at a time writes `folder`.

    The OS releases it when the holding process ends, however it ends (a crash or `kill -9` never leaves it held;
    processes forked from the holder, such as DataLoader workers, share it until they exit too), and Linux's NFS
    client makes it hold across hosts. While held, the file says who holds it (host, pid, start time, command, SLURM
    job); a second `acquire` on the folder, from any process, raises FolderInUse naming that holder. The lock file
    is never removed (removing it would let two runs lock two different files). On a filesystem without locks
    (e.g. Lustre mounted without `flock`), `acquire` logs a warning and goes on unlocked.
    """

    def __init__(self, folder, what='run'):
        self.folder, self.what = os.fspath(folder), what
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd = None

    def _holder(self, fd):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or 'null')
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict):
            return 'a process that has not written its details yet'
        job = f", SLURM job {info['slurm_job']}" if info.get('slurm_job') else ''
        return (f"a {info.get('what', 'run')} on host {info.get('host')}, pid {info.get('pid')}, started "
                f"{info.get('started')}{job} ({info.get('command')})")

    def acquire(self):
        """Take the lock (creating the folder); FolderInUse if another process holds it."""
        import fcntl
        import logging
        key = os.path.realpath(self.path)
        if key in _HELD:
            raise FolderInUse(f'{self.folder} is already in use by this process ({_HELD[key].what})')
        with writing(self.path):
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                holder = self._holder(fd)
                os.close(fd)
                raise FolderInUse(f'{self.folder} is in use by {holder}; lock file {self.path}. Wait for that run '
                                  'to end or stop it, or use another folder') from None
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise WriteError.of(self.path, e) from None
            logging.warning('cannot lock %s (%s): this filesystem has no file locks, so nothing stops a second run '
                            'from writing %s at the same time', self.path, e.strerror, self.folder)
            return self
        info = dict(what=self.what, host=socket.gethostname(), pid=os.getpid(),
                    started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), slurm_job=os.environ.get('SLURM_JOB_ID'),
                    command=' '.join(sys.argv))
        try:
            with writing(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD[key] = self
        return self

    def release(self):
        if self.fd is not None:
            _HELD.pop(os.path.realpath(self.path), None)
            os.close(self.fd)                       # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
