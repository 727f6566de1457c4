"""Class names of the configs and class requests (ids or names) -> ids (libs/data/class_names.py)."""
import pytest

from conftest import ROOT
from libs.config import ConfigError, load_config
from libs.data.class_names import class_names, resolve_classes
from libs.data.image_folder import write_class_record


def names_of(config_name):
    return class_names(load_config(str(ROOT / 'configs' / f'{config_name}.py')))


def test_names_of_every_config():
    assert names_of('digits_DiM_tiny') == [str(k) for k in range(10)]
    assert names_of('cifar10_S_DiM') is None                                  # unconditional
    for name in ('imagenet256_H_DiM', 'imagenet256_L_DiM', 'imagenet512_H_DiM_ft',
                 'imagenet512_H_DiM_upsample_test', 'imagenet512_H_DiM_upsample_3x_test'):
        imagenet = names_of(name)
        assert len(imagenet) == 1000 and len(set(imagenet)) == 1000
        # the sorted-wnid order: n01440764 tench first, n15075141 toilet tissue last
        assert (imagenet[0], imagenet[207], imagenet[360], imagenet[388], imagenet[999]) == \
            ('tench', 'golden retriever', 'otter', 'giant panda', 'toilet tissue')


def test_a_conditional_cifar_run_has_the_cifar_names_and_a_wrong_class_count_is_refused():
    config = load_config(str(ROOT / 'configs' / 'cifar10_S_DiM.py'))
    config.train.mode = 'cond'
    assert class_names(config)[:3] == ['airplane', 'automobile', 'bird'] and len(class_names(config)) == 10
    config.nnet.num_embeds_ada_norm = 12
    with pytest.raises(ConfigError, match="'cifar10' has 10 class names but the network has "
                                          "config.nnet.num_embeds_ada_norm=12 classes"):
        class_names(config)


def test_ids_and_names_case_insensitive():
    imagenet = names_of('imagenet256_H_DiM')
    assert resolve_classes(['207', 'otter', ' Giant Panda ', 5], imagenet, 1000) == [207, 360, 388, 5]
    assert resolve_classes(['3', 3, '0'], names_of('digits_DiM_tiny'), 10) == [3, 3, 0]
    assert resolve_classes(['4', 9], None, 10) == [4, 9]
    # the one pair of names that differ by case only: the exact name decides
    assert resolve_classes(['Cardigan', 'cardigan'], imagenet, 1000) == [264, 474]
    with pytest.raises(ValueError, match=r"'CARDIGAN' names more than one class: 'Cardigan' \(264\), 'cardigan' "
                                         r"\(474\); give the exact name or the id"):
        resolve_classes(['CARDIGAN'], imagenet, 1000)


def test_unknown_names_fail_with_the_closest_names_and_every_problem_at_once():
    imagenet = names_of('imagenet256_H_DiM')
    with pytest.raises(ValueError) as err:
        resolve_classes(['golden retreiver', 'otter', '1000', 'zzzzqqq'], imagenet, 1000)
    message = str(err.value)
    assert "no class named 'golden retreiver'; closest names: 'golden retriever' (207)" in message
    assert "class id 1000 is out of range [0, 1000)" in message
    assert "no class named 'zzzzqqq'; closest names: none" in message
    with pytest.raises(ValueError, match=r"'seven' is not a class id in \[0, 10\) \(this model's classes have no "
                                         r"names\)"):
        resolve_classes(['seven'], None, 10)
    with pytest.raises(ValueError, match=r"class id -1 is out of range"):
        resolve_classes([-1], None, 10)


def test_a_runs_classes_json_names_its_classes_and_image_folders_name_theirs(tmp_path):
    config = load_config(str(ROOT / 'configs' / 'image_folder_DiM_S.py'))
    folder = tmp_path / 'images'
    for name in ('tulip', 'rose', 'daisy'):
        (folder / name).mkdir(parents=True)
    (folder / '.cache').mkdir()
    config.dataset = dict(name='image_folder', path=str(folder), resolution=32)
    config.nnet.num_embeds_ada_norm = 3
    assert class_names(config) == ['daisy', 'rose', 'tulip']
    run = tmp_path / 'run'
    nnet = run / 'ckpts' / '100.ckpt' / 'nnet_ema.pth'
    nnet.parent.mkdir(parents=True)
    write_class_record(run / 'ckpts', dict(num_classes=3, classes=['a', 'b', 'c']))
    assert class_names(config, str(nnet)) == ['a', 'b', 'c']          # the names the network was trained with
    assert resolve_classes(['B', 2], class_names(config, str(nnet)), 3) == [1, 2]
    config.dataset = dict(name='features', path=str(tmp_path / 'features'))
    (tmp_path / 'features').mkdir()
    assert class_names(config) is None                                   # features without names: ids only
    write_class_record(tmp_path / 'features', dict(num_classes=3, classes=['x', 'y', 'z']))
    assert class_names(config) == ['x', 'y', 'z']
