"""Config values checked before a run starts: every key named with its value and what it must be."""
import pytest

from conftest import ROOT
from libs.config import load_config
from libs.training.config import ConfigError, check_batch_split, check_config

CONFIGS = sorted(p for p in (ROOT / 'configs').glob('*.py') if 'upsample' not in p.name)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_pass(path):
    check_config(load_config(str(path)))


def _digits():
    return load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))


@pytest.mark.parametrize('key, value, message', [
    ('train.batch_size', -4, 'config.train.batch_size=-4: must be an integer >= 1'),
    ('train.n_steps', 0, 'config.train.n_steps=0: must be an integer >= 1'),
    ('train.log_interval', 0, 'config.train.log_interval=0'),
    ('train.eval_interval', -1, 'config.train.eval_interval=-1'),
    ('train.save_interval', 0, 'config.train.save_interval=0'),
    ('train.keep_ckpts', 0, 'config.train.keep_ckpts=0'),
    ('train.num_workers', -1, 'config.train.num_workers=-1: must be an integer >= 0'),
    ('train.ema_rate', 1.5, 'config.train.ema_rate=1.5: must be a number in [0, 1]'),
    ('train.ema_rate', float('nan'), 'config.train.ema_rate=nan'),
    ('train.mode', 'semi', "config.train.mode='semi'; expected 'cond' or 'uncond'"),
    ('train.report_per_class', 0, 'config.train.report_per_class=0'),
    ('train.fid_interval', -1, 'config.train.fid_interval=-1: must be an integer >= 0'),
    ('train.fid_interval', 900, 'config.train.fid_interval=900 must be a multiple of config.train.save_interval=600'),
    ('train.prefetch_factor', 0, 'config.train.prefetch_factor=0: must be an integer >= 1'),
    ('train.pin_memory', 'yes', "config.train.pin_memory='yes': must be True or False"),
    ('train.save_every_minutes', -5.0, 'config.train.save_every_minutes=-5.0: must be a number of minutes >= 0'),
    ('train.stop_signals', ('SIGTERM', 'SIGKILL'), "config.train.stop_signals=('SIGTERM', 'SIGKILL'): must be a list of "
                                                  'signal names among SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP, SIGQUIT'),
    ('sample.intermediate_n_samples', 1, 'config.sample.intermediate_n_samples=1: must be an integer >= 2'),
    ('sample.n_samples', 0, 'config.sample.n_samples=0'),
    ('sample.inception_path', 3, 'config.sample.inception_path=3: must be a file path'),
    ('optimizer.lr', 0.0, 'config.optimizer.lr=0.0: must be a number > 0'),
    ('optimizer.lr', -1e-4, 'config.optimizer.lr=-0.0001'),
    ('optimizer.eps', 0.0, 'config.optimizer.eps=0.0'),
    ('optimizer.weight_decay', -0.1, 'config.optimizer.weight_decay=-0.1: must be >= 0'),
    ('optimizer.betas', (0.9, 1.0), 'config.optimizer.betas=(0.9, 1.0): must be two numbers in [0, 1)'),
    ('lr_scheduler.warmup_steps', -5, 'config.lr_scheduler.warmup_steps=-5'),
    ('gradient_accumulation_steps', 0, 'config.gradient_accumulation_steps=0'),
    ('max_grad_norm', -1.0, 'config.max_grad_norm=-1.0'),
    ('sample.mini_batch_size', 0, 'config.sample.mini_batch_size=0'),
    ('seed', -1, 'config.seed=-1'),
    ('compile', 'fast', "config.compile='fast'; expected one of 'none', 'default', 'max-autotune', 'reduce-overhead'"),
])
def test_bad_values_are_named(key, value, message):
    config = _digits()
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError) as e:
        check_config(config)
    assert message in str(e.value)


def test_fused_must_be_a_bool():
    config = _digits()
    del config.optimizer['fused']
    config.optimizer.fused = 'auto'
    with pytest.raises(ConfigError, match="config.optimizer.fused='auto': must be True or False"):
        check_config(config)


def test_every_problem_is_reported_at_once():
    config = _digits()
    config.train.batch_size, config.train.n_steps = 0, -1
    with pytest.raises(ConfigError, match=r'config.train.n_steps=-1.*; config.train.batch_size=0'):
        check_config(config)


def test_unknown_train_keys_are_typos():
    config = _digits()
    config.train.bach_size = 8
    with pytest.raises(ConfigError, match=r'unknown key\(s\) config.train.bach_size'):
        check_config(config)


def test_max_grad_norm_zero_or_none_means_no_clipping():
    config = _digits()
    for value in (0.0, None):
        config.max_grad_norm = value
        check_config(config)


def test_batch_must_split_over_the_processes():
    config = _digits()
    config.train.batch_size = 64
    check_batch_split(config, 8)
    with pytest.raises(ConfigError, match='config.train.batch_size=64: the global batch size 64 is not divisible by the 3 processes'):
        check_batch_split(config, 3)


def test_keys_nothing_reads_are_refused_in_every_section():
    config = _digits()
    config.pred = 'noise_pred'
    config.optimizer.momentum = 0.9
    config.lr_scheduler.decay_steps = 10
    config.sample.steps = 50
    config.dataset.cfg = True
    with pytest.raises(ConfigError) as e:
        check_config(config)
    for message in ("config.optimizer.momentum", "config.lr_scheduler.decay_steps", "config.pred: nothing reads them",
                    "unknown key(s) config.sample.steps", "unknown key(s) config.dataset.cfg for data set 'digits'"):
        assert message in str(e.value)
