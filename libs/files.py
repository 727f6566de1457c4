"""Files a run reads and writes: every missing input reported at once, JSON written atomically, content hashes."""
import hashlib
import json
import os

__all__ = ['FileChecks', 'write_json', 'file_sha256']


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


def write_json(path, obj):
    """JSON file written atomically (a temporary file renamed over `path`)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def file_sha256(path, chunk=1 << 24):
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
