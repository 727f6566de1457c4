"""The sample folder of eval_ldm_discrete.py: `{i}.png` written atomically from a worker thread and read back as
uint8, the run.json guard against mixing runs, the free-space estimate of the images still to write, and the ``.npz``
that ADM's TensorFlow evaluator (guided-diffusion ``evaluations/evaluator.py``) reads. A failed write removes its
temporary file and raises libs.files.WriteError naming the file and the OS error."""
from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from libs.files import check_free_space, writing, write_json

from .fid import IMAGE_EXTENSIONS

__all__ = ['NPZ_NAME', 'image_names', 'prepare_output_dir', 'png_array', 'write_png', 'read_png',
           'PngWriter', 'write_adm_npz', 'check_folder_space']

_PNG = re.compile(r'^(0|[1-9]\d*)\.png$')
_TMP = re.compile(r'^\.(\d+\.png|samples\.npz)\.\d+\.tmp$')
NPZ_NAME = 'samples.npz'
# run.json fields that may change between restarts of one run (they do not change which images are made).
_NOT_COMPARED = ('nnet_path', 'mini_batch_size')


def image_names(folder):
    """{index: name} of the `{i}.png` files in folder, and the names of its other image files."""
    ours, others = {}, []
    for name in os.listdir(folder):
        match = _PNG.match(name)
        if match:
            ours[int(match.group(1))] = name
        elif name.lower().endswith(IMAGE_EXTENSIONS):
            others.append(name)
    return ours, sorted(others)


def prepare_output_dir(folder, run, overwrite):
    """Create the folder, or check that the images already in it come from this run; write run.json.

    Images of another run (or of an unknown one) are an error unless `overwrite`, which deletes them.
    """
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):                  # leftovers of an interrupted write
        if _TMP.match(name):
            os.remove(os.path.join(folder, name))
    ours, others = image_names(folder)
    if others:
        raise RuntimeError(f"{folder} holds image files not written by this script ({others[:5]}...); they would "
                           "count in the FID. Remove them or choose another --output_dir")
    run_file = os.path.join(folder, 'run.json')
    previous = None
    if os.path.isfile(run_file):
        with open(run_file) as f:
            previous = json.load(f)
    stale = sorted(i for i in ours if i >= run['n_samples'])
    if ours and previous is None:
        problem = f"holds {len(ours)} images but no run.json (unknown run)"
    else:
        diff = {k: (previous.get(k), v) for k, v in run.items()
                if ours and k not in _NOT_COMPARED and previous.get(k) != v}
        problem = (f"holds {len(ours)} images of another run; differences (before, now): {diff}" if diff else
                   f"holds images {stale[:5]}... beyond n_samples={run['n_samples']}" if stale else None)
    if problem:
        if not overwrite:
            raise RuntimeError(f"output folder {folder} {problem}. Pass --overwrite to delete them, or choose "
                               "another --output_dir")
        logging.warning('deleting %d images of another run in %s (--overwrite)', len(ours), folder)
        for name in [*ours.values(), 'results.json', NPZ_NAME]:
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    write_json(run_file, run)


def png_array(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 image, C in {1, 3} -> the array PIL writes: (H, W, 3), or (H, W) for one channel."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 image (1 or 3, H, W), got {image.dtype} {tuple(image.shape)}")
    array = image.permute(1, 2, 0).cpu().numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def write_png(array: np.ndarray, path: str) -> None:
    """Write ``array`` (png_array's layout) to ``path`` as a PNG, atomically (``.{name}.{pid}.tmp``, then rename)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    with writing(path, cleanup=[tmp]):
        Image.fromarray(array).save(tmp, format='PNG')
        os.replace(tmp, path)


# PNG sizes vary from image to image; the estimate from one image is given this margin.
_PNG_SIZE_MARGIN = 1.25


def check_folder_space(folder, n_images, image, npz_images=0):
    """Raise libs.files.NotEnoughSpace unless `folder` has room for `n_images` PNGs like `image` (png_array's
    layout; the estimate is its PNG size with a 25 % margin, in whole filesystem blocks) and for the uncompressed
    samples.npz of `npz_images` images (0: none)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    block = os.statvfs(folder).f_bsize
    need = n_images * block * -(-int(buffer.tell() * _PNG_SIZE_MARGIN) // block)
    what = f'{n_images} PNG images (about {buffer.tell():,} bytes each)'
    if npz_images:
        need += npz_images * image.shape[0] * image.shape[1] * 3 + (1 << 16)
        what += f' and the {NPZ_NAME} of {npz_images} images'
    check_free_space(folder, need, what)


def read_png(path: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB image from a file (grey images repeated over the channels, as FID reads them)."""
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert('RGB'))).permute(2, 0, 1).contiguous()


class PngWriter:
    """Writes PNGs on one worker thread so that sampling goes on meanwhile; at most ``max_pending`` images wait.

    The first write error is raised in the caller at the next :meth:`put` or at :meth:`close` (``with`` exit);
    after an error the remaining queued images are dropped, never half written (each write is atomic).
    """

    def __init__(self, max_pending: int = 64):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name='png-writer', daemon=True)
        self._thread.start()

    def _run(self):
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    write_png(*item)
                except BaseException as e:     # reported to the caller
                    self._error = e

    def _raise(self):
        if self._error is not None:
            raise RuntimeError(f'writing sample PNGs failed: {self._error}') from self._error

    def put(self, array: np.ndarray, path: str) -> None:
        """Queue ``array`` for :func:`write_png` (blocks while ``max_pending`` images wait)."""
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError('the PNG writer is closed')
        self._queue.put((array, path))

    def close(self) -> None:
        """Wait until every queued image is written; raise the first write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._thread.is_alive():        # an error in the caller: finish the queued writes, report that one
            self._queue.put(None)
            self._thread.join()


def write_adm_npz(path: str, files: list[str], threads: int | None = None, chunk: int = 256) -> tuple[int, ...]:
    """Write the images ``files`` (in order) to ``path`` as ADM's sample batches: an ``.npz`` holding ``arr_0``, uint8
    (N, H, W, 3), stored uncompressed (what ``np.savez`` writes), streamed so memory stays at ``chunk`` images.

    All images must have one size. Written atomically (``.{name}.{pid}.tmp``, then rename); returns the shape.
    """
    if not files:
        raise ValueError('no images to write')
    first = read_png(files[0])
    shape = (len(files), first.shape[1], first.shape[2], 3)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    header = {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False, 'shape': shape}
    with writing(path, cleanup=[tmp]), ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        check_free_space(folder, int(np.prod(shape)) + (1 << 16), path)
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as archive, \
                archive.open('arr_0.npy', 'w', force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for start in range(0, len(files), chunk):
                for file, image in zip(files[start:start + chunk], pool.map(read_png, files[start:start + chunk])):
                    if tuple(image.shape) != (3, *shape[1:3]):
                        raise ValueError(f'{file} is {tuple(image.shape[1:])}, the first image {shape[1:3]}: '
                                         'the .npz needs one image size')
                    member.write(image.permute(1, 2, 0).contiguous().numpy().tobytes())
        os.replace(tmp, path)
    return shape
