"""The image_folder data set on folders the tests write: labels and class names, the unconditional layout, layout
errors, bad files (skipped at the scan or replaced when read, always named and counted), small images, classes.json."""
import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from image_folders import PALETTE, dominant_classes, shape_image, write_shapes, write_text_as_jpeg, write_truncated_jpeg
from libs.data.datasets import get_dataset
from libs.data.image_folder import (CheckedImages, ImageFolder, read_class_names, read_class_record,
                                    write_class_record)


def _levels(notes, level):
    return [message for lvl, message in notes if lvl == level]


def test_class_subfolders_give_sorted_classes_and_labels(tmp_path):
    written = write_shapes(tmp_path, classes=('yellow', 'blue', 'red'), per_class=5)
    (tmp_path / 'red' / 'labels.txt').write_text('not an image')              # other files are ignored
    (tmp_path / '.cache').mkdir()                                              # hidden folders are not classes
    (tmp_path / 'blue' / '.hidden.png').write_bytes(b'')
    d = get_dataset('image_folder', path=str(tmp_path), resolution=16, random_flip=False, p_uncond=0.1)
    assert d.class_names == ['blue', 'red', 'yellow'] and d.num_classes == 3 and len(d) == 15
    assert d.files == sorted(written) and d.kind == 'pixels' and d.item_shape == (3, 16, 16)
    names = ('yellow', 'blue', 'red')                                          # write_shapes' class order
    assert d.labels.tolist() == [d.class_names.index(names[written[f]]) for f in d.files]
    assert any('/more/' in f for f in d.files)                                 # nested folders belong to their class
    x = torch.stack([d[i][0] for i in range(len(d))])
    assert x.shape == (15, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    # every crop shows its class's colour (PNG, JPEG, WebP and BMP files alike)
    assert dominant_classes((x + 1) / 2, d.class_names).tolist() == d.labels.tolist()
    info = ' '.join(_levels(d.notes, logging.INFO))
    assert '15 images, 3 classes (0 blue, 1 red, 2 yellow)' in info and '1 files without an image extension' in info
    assert d.record() == dict(num_classes=3, classes=['blue', 'red', 'yellow'], source=str(tmp_path))


def test_images_without_subfolders_are_unconditional(tmp_path):
    write_shapes(tmp_path, per_class=2, conditional=False)
    d = get_dataset('image_folder', path=str(tmp_path), resolution=8)
    assert d.num_classes == 0 and d.class_names == [] and len(d) == 8 and d.random_flip is True
    assert d.labels.tolist() == [0] * 8                                        # the null class
    assert 'no classes (images without class subfolders: unconditional)' in d.notes[0][1]
    assert d[0][0].shape == (3, 8, 8)


def test_files_are_decoded_by_content(tmp_path):
    """ImageNet holds PNG files named .JPEG and CMYK JPEGs: both are read."""
    rng = np.random.default_rng(0)
    (tmp_path / 'a').mkdir()
    Image.fromarray(shape_image(rng, PALETTE['red'], 20, 20)).save(tmp_path / 'a' / 'png_inside.JPEG', 'PNG')
    Image.fromarray(shape_image(rng, PALETTE['blue'], 20, 20)).convert('CMYK').save(tmp_path / 'a' / 'cmyk.jpg')
    d = ImageFolder(str(tmp_path), 16)
    x = torch.stack([d[i][0] for i in range(2)])
    assert dominant_classes((x + 1) / 2, ('blue', 'red')).tolist() == [0, 1]   # cmyk.jpg, png_inside.JPEG
    assert not _levels(d.notes, logging.WARNING)


@pytest.mark.parametrize('make, message', [
    (lambda p: (p / 'a').mkdir() or (p / 'b').mkdir() or write_shapes(p / 'a', per_class=1, conditional=False),
     r"class folder .*/b holds no images \(jpg/jpeg/png/webp/bmp\): add images or remove it"),
    (lambda p: write_shapes(p, per_class=1) and write_shapes(p, per_class=1, conditional=False),
     r"holds images \(4, e.g. .*\) beside subfolders \(blue, green, red, \.\.\.\): put every image in a class"),
    (lambda p: write_shapes(p / 'train', per_class=1) and write_shapes(p / 'val', per_class=1),
     r"subfolders of .* \(train, val\) look like data set splits, not classes: give the folder of one split, e.g. "
     r".*/train"),
    (lambda p: (p / 'readme.txt').write_text('x'), r"no images \(jpg/jpeg/png/webp/bmp\) in"),
    (lambda p: (p / 'a').mkdir() or write_text_as_jpeg(p / 'a' / 'x.jpg') or write_shapes(p / 'b', per_class=1),
     r".*/a holds no readable images: all 1 image files skipped, e.g. .*/a/x.jpg \(UnidentifiedImageError"),
], ids=['empty class', 'images beside classes', 'splits', 'no images', 'no readable image'])
def test_broken_layouts_are_refused_naming_the_folder(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ValueError, match=message):
        ImageFolder(str(tmp_path), 16)


def test_missing_folder_and_bad_resolution(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'image folder not found: {tmp_path}/none'):
        get_dataset('image_folder', path=str(tmp_path / 'none'), resolution=16)
    with pytest.raises(ValueError, match='config.dataset.resolution=0'):
        ImageFolder(str(tmp_path), 0)
    with pytest.raises(ValueError, match="missing a required argument: 'resolution'"):
        get_dataset('image_folder', path=str(tmp_path))


def test_unreadable_headers_are_skipped_named_and_counted(tmp_path):
    write_shapes(tmp_path, classes=('blue', 'red'), per_class=3)
    write_text_as_jpeg(tmp_path / 'red' / 'text.jpg')
    (tmp_path / 'blue' / 'empty.png').write_bytes(b'')
    d = ImageFolder(str(tmp_path), 16)
    assert len(d) == 6 and not any(f.endswith(('text.jpg', 'empty.png')) for f in d.files)
    assert [f for f, _ in d.skipped] == [str(tmp_path / 'blue' / 'empty.png'), str(tmp_path / 'red' / 'text.jpg')]
    warnings = _levels(d.notes, logging.WARNING)
    assert f"skipped {tmp_path / 'red' / 'text.jpg'}: not a readable image (UnidentifiedImageError" in warnings[1]
    assert f'2 of 8 image files under {tmp_path} skipped: not readable images (each named above)' in warnings


def test_damaged_data_is_replaced_by_the_next_image_of_its_class_and_counted(tmp_path, caplog):
    write_shapes(tmp_path, classes=('blue', 'red'), per_class=3)
    write_truncated_jpeg(tmp_path / 'red' / 'red_001_cut.jpg')
    write_truncated_jpeg(tmp_path / 'red' / 'red_002_cut.jpg', seed=1)
    d = ImageFolder(str(tmp_path), 16, random_flip=False)
    assert len(d) == 8                                          # the headers read: found only when decoded
    cut = d.files.index(str(tmp_path / 'red' / 'red_001_cut.jpg'))
    assert d.files[cut + 1].endswith('red_002_cut.jpg')
    with caplog.at_level(logging.WARNING):
        x, y = d[cut]
    assert int(y) == d.class_names.index('red')
    first_red = d.labels.tolist().index(int(y))
    assert cut + 2 == len(d) and torch.equal(x, d[first_red][0])   # the next readable image of its class (wrapped)
    assert f"damaged image {tmp_path / 'red' / 'red_001_cut.jpg'}: OSError: image file is truncated" in caplog.text
    assert f"damaged image {tmp_path / 'red' / 'red_002_cut.jpg'}" in caplog.text
    assert '2 damaged image file(s) met so far by this process' in caplog.text
    caplog.clear()
    d[cut]
    d[cut + 1]
    assert not caplog.text                                      # each damaged file is reported once

    # loader workers share what they found
    fresh = ImageFolder(str(tmp_path), 16)
    loader = torch.utils.data.DataLoader(fresh, batch_size=4, num_workers=2)
    assert sum(len(y) for _, y in loader) == 8
    assert np.frombuffer(fresh._damaged, dtype=np.int8).nonzero()[0].tolist() == [cut, cut + 1]


def test_one_pass_readers_get_the_error_instead_of_a_replacement(tmp_path):
    write_shapes(tmp_path, classes=('blue',), per_class=2)
    write_truncated_jpeg(tmp_path / 'blue' / 'cut.jpg')
    items = CheckedImages(ImageFolder(str(tmp_path), 16))
    pixels, label, error = items[2]
    assert items.folder.files[2].endswith('cut.jpg') and pixels.shape == (3, 16, 16) and not pixels.any()
    assert error.startswith(f"{tmp_path / 'blue' / 'cut.jpg'}: OSError") and int(label) == 0
    pixels, _, error = items[0]
    assert error == '' and pixels.dtype == torch.uint8 and pixels.float().std() > 0


def test_small_images_are_upsampled_with_a_counting_warning(tmp_path):
    write_shapes(tmp_path, classes=('red',), per_class=6, sizes=(24, 40))
    rng = np.random.default_rng(0)
    Image.fromarray(shape_image(rng, PALETTE['red'], 20, 9)).save(tmp_path / 'red' / 'tiny.png')
    d = ImageFolder(str(tmp_path), 16)
    warnings = _levels(d.notes, logging.WARNING)
    assert warnings == [f"1 of 7 images have a short side below 16 px and are upsampled: {tmp_path}/red/tiny.png "
                        "(20x9)"]
    x, _ = d[d.files.index(str(tmp_path / 'red' / 'tiny.png'))]
    assert x.shape == (3, 16, 16)
    assert len(_levels(ImageFolder(str(tmp_path), 32).notes, logging.WARNING)[0].split('(')) > 5   # 7 named: 5, ...


def test_class_names_file(tmp_path):
    path = write_class_record(tmp_path, dict(num_classes=2, classes=['daisy', 'tulip'], source='x'))
    assert path == str(tmp_path / 'classes.json')
    assert read_class_names(tmp_path) == read_class_names(path) == ['daisy', 'tulip']
    assert read_class_record(path)['source'] == 'x'
    write_class_record(tmp_path / 'u.json', dict(num_classes=0, classes=[]))
    assert read_class_names(tmp_path / 'u.json') == []
    (tmp_path / 'bad.json').write_text('{"num_classes": 3, "classes": ["a"]}')
    with pytest.raises(ValueError, match='is not a class-name file'):
        read_class_names(tmp_path / 'bad.json')
    with pytest.raises(FileNotFoundError, match='class names not found: .*/none/classes.json'):
        os.makedirs(tmp_path / 'none')
        read_class_names(tmp_path / 'none')
