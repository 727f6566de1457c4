"""Checks of a training config's values, run before any data, model or checkpoint is touched.

Each problem raises ConfigError naming the key, its value and what is expected; `check_config` reports every
problem found at once. `check_batch_split` needs the process count (after the Accelerator exists).
"""
import inspect
import math
import numbers

from libs.config import ConfigError, check_top_level_keys
from libs.data.batching import per_rank_batch
from libs.data.datasets import check_dataset_config
from libs.model.compile import COMPILE_MODES
from libs.model.memory_estimate import RECOMPUTE_MODES
from libs.sampling import SamplingSpec
from libs.training.optimizer import make_lr_scheduler, make_optimizer
from libs.training.preemption import STOP_SIGNALS

__all__ = ['ConfigError', 'check_config', 'check_batch_split', 'TRAIN_KEYS', 'fid_interval', 'intermediate_n_samples',
           'INTERMEDIATE_N_SAMPLES']


# Keys of config.train that the training script reads; anything else is a typo or a key of another script.
TRAIN_KEYS = ('n_steps', 'batch_size', 'mode', 'log_interval', 'eval_interval', 'save_interval', 'keep_ckpts',
              'num_workers', 'pin_memory', 'prefetch_factor', 'fid_interval', 'grid_columns', 'report_per_class',
              'ema_rate', 'save_every_minutes', 'stop_signals')
INTERMEDIATE_N_SAMPLES = 10_000     # samples of the in-training FID (the official loop's fid10000)


def fid_interval(config):
    """Steps between two in-training FID scores (0: none); config.train.fid_interval, default save_interval."""
    return config.train.get('fid_interval', config.train.save_interval)


def intermediate_n_samples(config):
    return config.sample.get('intermediate_n_samples', INTERMEDIATE_N_SAMPLES)


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


_REQUIRED = object()
# (key, default, minimum): integer keys; None as a default means "optional, None allowed".
INTEGER_KEYS = (
    ('train.n_steps', _REQUIRED, 1), ('train.batch_size', _REQUIRED, 1), ('train.log_interval', _REQUIRED, 1),
    ('train.eval_interval', _REQUIRED, 1), ('train.save_interval', _REQUIRED, 1), ('train.keep_ckpts', None, 1),
    ('train.num_workers', 0, 0), ('train.prefetch_factor', 2, 1), ('train.fid_interval', 0, 0),
    ('train.grid_columns', 10, 1), ('train.report_per_class', 50, 1), ('gradient_accumulation_steps', 1, 1),
    ('seed', _REQUIRED, 0), ('lr_scheduler.warmup_steps', 0, 0),
    ('sample.intermediate_n_samples', INTERMEDIATE_N_SAMPLES, 2), ('sample.n_samples', 1, 1),
)
# (key, default, test, what it must be): real-valued keys; a None default means "optional, None allowed".
REAL_KEYS = (
    ('train.ema_rate', 0.9999, lambda v: 0 <= v <= 1, 'a number in [0, 1]'),
    ('train.save_every_minutes', None, lambda v: v >= 0, 'a number of minutes >= 0 (0 or None: no timed saves)'),
    ('max_grad_norm', None, lambda v: v >= 0, '>= 0 (0 or None: no clipping)'),
    ('optimizer.lr', 2e-4, lambda v: v > 0, 'a number > 0'),
    ('optimizer.weight_decay', 0.03, lambda v: v >= 0, '>= 0'),
    ('optimizer.eps', 1e-8, lambda v: v > 0, 'a number > 0'),
)
BOOL_KEYS = (('train.pin_memory', True), ('optimizer.fused', True))


def _lookup(config, key, default):
    """config.<key> for a dotted key; `default` where it or its section is missing."""
    *sections, name = key.split('.')
    for section in sections:
        config = config.get(section)
        if config is None:
            return default
    return config.get(name, default)


def _value_problems(config):
    for key, default, minimum in INTEGER_KEYS:
        value = _lookup(config, key, default)
        if not (value is None and default is None) and (not _is_int(value) or value < minimum):
            yield f"config.{key}={None if value is _REQUIRED else value!r}: must be an integer >= {minimum}"
    for key, default, ok, expected in REAL_KEYS:
        value = _lookup(config, key, default)
        if not (value is None and default is None) and (not _is_real(value) or not ok(value)):
            yield f"config.{key}={value!r}: must be {expected}"
    for key, default in BOOL_KEYS:
        if _lookup(config, key, default) not in (True, False):
            yield f"config.{key}={_lookup(config, key, default)!r}: must be True or False"
    betas = _lookup(config, 'optimizer.betas', (0.9, 0.999))
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in betas)):
        yield f"config.optimizer.betas={betas!r}: must be two numbers in [0, 1)"
    path = _lookup(config, 'sample.inception_path', None)
    if path is not None and not isinstance(path, str):
        yield f"config.sample.inception_path={path!r}: must be a file path (or None: pytorch-fid's cache)"


def _choice_problems(config):
    tc = config.train
    fi, save = tc.get('fid_interval'), tc.get('save_interval')
    if _is_int(fi) and fi > 0 and _is_int(save) and save > 0 and fi % save:
        yield (f"config.train.fid_interval={fi} must be a multiple of config.train.save_interval={save} (the "
               "best-FID checkpoint is evaluated at the end), or 0 for no in-training FID")
    if config.get('recompute', 'auto') not in RECOMPUTE_MODES:
        yield (f"config.recompute={config.get('recompute')!r}; expected one of "
               f"{', '.join(map(repr, RECOMPUTE_MODES))}")
    if config.get('compile', 'none') not in COMPILE_MODES:
        yield f"config.compile={config.get('compile')!r}; expected one of {', '.join(map(repr, COMPILE_MODES))}"
    if tc.get('mode') not in ('cond', 'uncond'):
        yield f"config.train.mode={tc.get('mode')!r}; expected 'cond' or 'uncond'"
    names = tc.get('stop_signals', ())
    if not isinstance(names, (tuple, list)) or not set(names) <= set(STOP_SIGNALS):
        yield (f"config.train.stop_signals={names!r}: must be a list of signal names among {', '.join(STOP_SIGNALS)} "
               "(empty: the signals keep their default actions)")


def _unknown_keys(config):
    unknown = sorted(set(config.train.keys()) - set(TRAIN_KEYS))
    if unknown:
        yield f"unknown key(s) {', '.join('config.train.' + k for k in unknown)} (known: {', '.join(TRAIN_KEYS)})"
    for section, reader in (('optimizer', make_optimizer), ('lr_scheduler', make_lr_scheduler)):
        known = list(inspect.signature(reader).parameters)[1:]
        unknown = sorted(set(config.get(section, {}).keys()) - set(known))
        if unknown:
            yield (f"unknown key(s) {', '.join(f'config.{section}.{k}' for k in unknown)} "
                   f"(known: {', '.join(known)})")


def _section_problems(config):
    """What the readers of the other sections refuse: unknown top-level keys, config.sample, config.dataset."""
    for check in (lambda: check_top_level_keys(config), lambda: SamplingSpec.from_config(config),
                  lambda: check_dataset_config(**config.dataset)):
        try:
            check()
        except (ValueError, KeyError, AttributeError) as e:
            yield str(e)


def _problems(config):
    if config.get('train') is None:
        yield 'config.train is missing'
        return
    for problems in (_unknown_keys, _value_problems, _choice_problems, _section_problems):
        yield from problems(config)


def check_config(config):
    """Raise ConfigError listing every invalid value of a training config."""
    problems = list(_problems(config))
    if problems:
        raise ConfigError('invalid training config: ' + '; '.join(problems))


def check_batch_split(config, num_processes):
    """config.train.batch_size is the global micro-batch (an optimiser step takes gradient_accumulation_steps of
    them): it must split evenly over the processes."""
    try:
        per_rank_batch(config.train.batch_size, num_processes)
    except ValueError as e:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size}: {e}") from None
