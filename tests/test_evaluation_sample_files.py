"""libs/evaluation/sample_files.py: the PNG writer thread (bounded, errors raised in the caller, atomic files) and the .npz that
ADM's evaluator reads, read back here as that evaluator streams it."""
import os
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import libs.evaluation.sample_files as sf
from libs.evaluation.sample_files import PngWriter, png_array, read_png, write_adm_npz, write_png


def random_images(n, h=6, w=5, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def test_png_array_and_read_png_round_trip(tmp_path):
    images = random_images(2)
    write_png(png_array(images[0]), str(tmp_path / '0.png'))
    assert torch.equal(read_png(str(tmp_path / '0.png')), images[0])
    grey = images[1, :1]
    write_png(png_array(grey), str(tmp_path / 'g.png'))
    with Image.open(tmp_path / 'g.png') as img:
        assert img.mode == 'L'
    assert torch.equal(read_png(str(tmp_path / 'g.png')), grey.expand(3, -1, -1))   # as FID reads a grey image
    assert sorted(os.listdir(tmp_path)) == ['0.png', 'g.png']                        # no temporary file left
    with pytest.raises(ValueError, match='uint8 image'):
        png_array(images[0].float())


def test_png_writer_writes_what_write_png_writes(tmp_path):
    images = random_images(5)
    (tmp_path / 'direct').mkdir()
    (tmp_path / 'thread').mkdir()
    with PngWriter(max_pending=2) as writer:
        for i, image in enumerate(images):
            write_png(png_array(image), str(tmp_path / 'direct' / f'{i}.png'))
            writer.put(png_array(image), str(tmp_path / 'thread' / f'{i}.png'))
    for i in range(5):
        assert (tmp_path / 'direct' / f'{i}.png').read_bytes() == (tmp_path / 'thread' / f'{i}.png').read_bytes()
    assert len(os.listdir(tmp_path / 'thread')) == 5
    with pytest.raises(RuntimeError, match='closed'):
        writer.put(png_array(images[0]), str(tmp_path / 'late.png'))


def test_png_writer_queue_is_bounded(tmp_path, monkeypatch):
    gate, written, queued = threading.Event(), [], []
    monkeypatch.setattr(sf, 'write_png', lambda array, path: (gate.wait(), written.append(path)))
    writer = PngWriter(max_pending=2)

    def produce():
        for i in range(6):
            writer.put(np.zeros((2, 2), np.uint8), f'{i}.png')
            queued.append(i)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.5)
    assert producer.is_alive() and len(queued) <= 3          # 2 waiting + 1 being written, while writes are stuck
    gate.set()
    producer.join(timeout=10)
    writer.close()
    assert written == [f'{i}.png' for i in range(6)]


def test_png_writer_raises_the_first_error_and_drops_the_rest(tmp_path, monkeypatch):
    real = sf.write_png

    def write(array, path):
        if path.endswith('1.png'):
            raise OSError('disk full')
        real(array, path)

    monkeypatch.setattr(sf, 'write_png', write)
    writer = PngWriter()
    with pytest.raises(RuntimeError, match='writing sample PNGs failed: disk full') as err:
        try:                    # the error surfaces at the next put or at close, as the writer thread gets there
            for i, image in enumerate(random_images(3)):
                writer.put(png_array(image), str(tmp_path / f'{i}.png'))
        finally:
            writer.close()
    assert isinstance(err.value.__cause__, OSError)
    assert sorted(os.listdir(tmp_path)) == ['0.png']           # 2.png, queued after the error, is dropped


def test_png_writer_leaves_the_callers_error_alone(tmp_path):
    with pytest.raises(KeyError):
        with PngWriter() as writer:
            writer.put(png_array(random_images(1)[0]), str(tmp_path / '0.png'))
            raise KeyError('sampling failed')
    assert os.listdir(tmp_path) == ['0.png']                    # the queued write was finished, atomically


def read_like_adm(path):
    """Stream arr_0 out of the zip as ADM's evaluator does: the .npy member's header, then raw rows."""
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo('arr_0.npy').compress_type == zipfile.ZIP_STORED
        with archive.open('arr_0.npy') as member:
            assert np.lib.format.read_magic(member) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            assert not fortran
            rows = [np.frombuffer(member.read(int(np.prod(shape[1:]))), dtype).reshape(shape[1:])
                    for _ in range(shape[0])]
            assert member.read() == b''
    return np.stack(rows)


def test_adm_npz(tmp_path):
    images = random_images(5, h=4, w=7)
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f'{i}.png'))
        write_png(png_array(image[:1] if i == 3 else image), files[-1])      # 3.png is grey
    expected = images.permute(0, 2, 3, 1).numpy().copy()
    expected[3] = expected[3, :, :, :1]
    out = tmp_path / 'samples.npz'
    assert write_adm_npz(str(out), files, threads=2, chunk=2) == (5, 4, 7, 3)
    with np.load(out) as f:
        assert f.files == ['arr_0'] and f['arr_0'].dtype == np.uint8
        np.testing.assert_array_equal(f['arr_0'], expected)
    np.testing.assert_array_equal(read_like_adm(out), expected)

    write_png(np.zeros((5, 7, 3), np.uint8), str(tmp_path / 'tall.png'))
    with pytest.raises(ValueError, match=r'tall\.png is \(5, 7\).*one image size'):
        write_adm_npz(str(tmp_path / 'bad.npz'), [files[0], str(tmp_path / 'tall.png')])
    assert not any(name.startswith(('bad', '.bad')) for name in os.listdir(tmp_path))
    with pytest.raises(ValueError, match='no images'):
        write_adm_npz(str(tmp_path / 'bad.npz'), [])
