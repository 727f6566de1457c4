"""Config files and the keys every script reads (libs/config.py): nothing unread passes silently."""
import pytest

from conftest import ROOT
from libs.config import ConfigError, check_top_level_keys, config_name, is_conditional, load_config, num_classes

CONFIGS = sorted((ROOT / 'configs').glob('*.py'))


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_has_only_keys_that_are_read(path):
    config = load_config(str(path))
    check_top_level_keys(config)
    assert config_name(str(path)) == path.stem


def test_unread_keys_are_refused_by_name():
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.pred = 'noise_pred'
    config.autoencoder = dict(pretrained_path='x', scale=0.2)
    with pytest.raises(ConfigError, match=r"config.pred, config.autoencoder.scale: nothing reads them"):
        check_top_level_keys(config)


def test_conditional_mode_and_class_count():
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    assert is_conditional(config) and num_classes(config) == 10
    del config['train']                                    # evaluation-only configs: class-conditional
    assert is_conditional(config)
    config.train = dict(mode='semi')
    with pytest.raises(ConfigError, match="config.train.mode='semi'"):
        is_conditional(config)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothere.py'):
        load_config(str(tmp_path / 'nothere.py'))
