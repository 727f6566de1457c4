"""TrainData's loader: worker processes load items only, so the batches a step sees do not depend on their number;
pinned memory only where there is a CUDA device to copy to. The data is checked against the config (class count,
mode, batch size) and the run's classes.json before any step."""
import pytest
import torch

from conftest import ROOT
from image_folders import folder_config, write_shapes
from libs.config import ConfigError, load_config
from libs.data.image_folder import read_class_names, write_class_record
from libs.training.data import TrainData
from libs.training.rng import RunRNG


def _data(**train):
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.train.update(dict(batch_size=8), **train)
    config.dataset.random_flip = True                   # exercise the flips as well as the label dropout
    return TrainData(config, 'cpu')


def _stream(data, start, n):
    rng = RunRNG(data.config.seed, 0, 'cpu')
    batches = iter(data.loader(0, 1, start))
    return [data.next_batch(batches, rng) for _ in range(n)]


def test_workers_do_not_change_the_batches():
    inline = _stream(_data(num_workers=0), start=5, n=4)
    workers = _stream(_data(num_workers=2, prefetch_factor=3), start=5, n=4)
    for (za, ya), (zb, yb) in zip(inline, workers):
        assert torch.equal(za, zb) and torch.equal(ya, yb)
    assert (torch.cat([y for _, y in inline]) == 10).any()          # some labels were dropped to the null class


def test_memory_is_pinned_only_for_cuda():
    data = _data(num_workers=0, pin_memory=True)
    assert data.pin_memory is False and data.loader(0, 1, 0).pin_memory is False
    loader = _data(num_workers=2, prefetch_factor=3).loader(0, 1, 0)
    assert loader.prefetch_factor == 3 and loader.num_workers == 2


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    write_shapes(root / 'classes', classes=('blue', 'green', 'red'), per_class=3)
    write_shapes(root / 'plain', per_class=2, conditional=False)
    return root


def _folder_config(tmp_path, images, num_classes, **sections):
    return load_config(folder_config(tmp_path / 'config.py', images, num_classes, **sections))


@pytest.mark.parametrize('folder, num_classes, sections, message', [
    ('classes', 1000, {}, "config.nnet.num_embeds_ada_norm=1000 but data set 'image_folder' ({root}/classes) has 3 "
                          "classes (blue, green, red): set config.nnet.num_embeds_ada_norm=3"),
    ('plain', 3, {'train': dict(mode='uncond')},
     "config.nnet.num_embeds_ada_norm=3 but data set 'image_folder' ({root}/plain) has no classes (unconditional: "
     "only the null class): set config.nnet.num_embeds_ada_norm=0"),
    ('plain', 0, {'train': dict(mode='cond')},
     "config.train.mode='cond' but data set 'image_folder' ({root}/plain) has no classes (images without class "
     "subfolders): set config.train.mode='uncond' (and config.sample.cfg=False)"),
    ('classes', 3, {'train': dict(batch_size=16)},
     "data set 'image_folder' ({root}/classes) has 9 items, fewer than one batch (config.train.batch_size=16): add "
     "images or lower config.train.batch_size"),
], ids=['class count', 'unconditional class count', 'unconditional cond mode', 'batch'])
def test_data_that_does_not_fit_the_config_is_refused(shapes, tmp_path, folder, num_classes, sections, message):
    config = _folder_config(tmp_path, shapes / folder, num_classes, **sections)
    with pytest.raises(ConfigError) as e:
        TrainData(config, 'cpu')
    assert str(e.value) == message.format(root=shapes)


def test_class_names_are_written_and_checked_on_resume(shapes, tmp_path):
    config = _folder_config(tmp_path, shapes / 'classes', 3)
    data = TrainData(config, 'cpu', workdir=str(tmp_path))
    (tmp_path / 'ckpts').mkdir()
    data.write_class_names(str(tmp_path), str(tmp_path / 'ckpts'))
    assert read_class_names(tmp_path) == read_class_names(tmp_path / 'ckpts') == ['blue', 'green', 'red']
    TrainData(config, 'cpu', workdir=str(tmp_path))                    # the same classes: resumes
    write_class_record(tmp_path, dict(num_classes=3, classes=['blue', 'green', 'tulip']))
    with pytest.raises(ConfigError, match=r"the 3 classes of data set 'image_folder' .* differ from the 3 the run in "
                                          r".* was trained on .*classes.json.*train in a new workdir"):
        TrainData(config, 'cpu', workdir=str(tmp_path))
    digits = _data(num_workers=0)
    assert digits.class_record is None
    digits.write_class_names(str(tmp_path / 'ckpts'))                    # class names unknown: nothing written
