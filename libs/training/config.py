"""Checks of a training config's values, run before any data, model or checkpoint is touched.

Each problem raises ConfigError naming the key, its value and what is expected; `check_config` reports every
problem found at once. `check_batch_split` needs the process count (after the Accelerator exists).
"""
import math
import numbers

from libs.config import ConfigError, check_top_level_keys
from libs.data.batching import per_rank_batch
from libs.data.datasets import check_dataset_config
from libs.model.compile import COMPILE_MODES
from libs.sampling import SamplingSpec

__all__ = ['ConfigError', 'check_config', 'check_batch_split', 'TRAIN_KEYS', 'fid_interval', 'intermediate_n_samples',
           'INTERMEDIATE_N_SAMPLES']


# Keys of config.train that the training script reads; anything else is a typo or a key of another script.
TRAIN_KEYS = ('n_steps', 'batch_size', 'mode', 'log_interval', 'eval_interval', 'save_interval', 'keep_ckpts',
              'num_workers', 'pin_memory', 'prefetch_factor', 'fid_interval', 'grid_columns', 'report_per_class',
              'ema_rate')
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


def _problems(config):
    tc = config.get('train')
    if tc is None:
        yield 'config.train is missing'
        return
    unknown = sorted(set(tc.keys()) - set(TRAIN_KEYS))
    if unknown:
        yield f"unknown key(s) {', '.join('config.train.' + k for k in unknown)} (known: {', '.join(TRAIN_KEYS)})"

    def integer(key, value, minimum, optional=False):
        if value is None and optional:
            return None
        if not _is_int(value) or value < minimum:
            return f"{key}={value!r}: must be an integer >= {minimum}"

    def real(key, value, ok, expected):
        if not _is_real(value) or not ok(value):
            return f"{key}={value!r}: must be {expected}"

    checks = [
        integer('config.train.n_steps', tc.get('n_steps'), 1),
        integer('config.train.batch_size', tc.get('batch_size'), 1),
        integer('config.train.log_interval', tc.get('log_interval'), 1),
        integer('config.train.eval_interval', tc.get('eval_interval'), 1),
        integer('config.train.save_interval', tc.get('save_interval'), 1),
        integer('config.train.keep_ckpts', tc.get('keep_ckpts'), 1, optional=True),
        integer('config.train.num_workers', tc.get('num_workers', 0), 0),
        integer('config.train.prefetch_factor', tc.get('prefetch_factor', 2), 1),
        integer('config.train.fid_interval', tc.get('fid_interval', 0), 0),
        integer('config.train.grid_columns', tc.get('grid_columns', 10), 1),
        integer('config.train.report_per_class', tc.get('report_per_class', 50), 1),
        integer('config.gradient_accumulation_steps', config.get('gradient_accumulation_steps', 1), 1),
        integer('config.seed', config.get('seed'), 0),
        real('config.train.ema_rate', tc.get('ema_rate', 0.9999), lambda v: 0 <= v <= 1, 'a number in [0, 1]'),
        None if config.get('max_grad_norm') is None else
        real('config.max_grad_norm', config.get('max_grad_norm'), lambda v: v >= 0, '>= 0 (0 or None: no clipping)'),
    ]
    if tc.get('pin_memory', True) not in (True, False):
        checks.append(f"config.train.pin_memory={tc.get('pin_memory')!r}: must be True or False")
    fi, save = tc.get('fid_interval'), tc.get('save_interval')
    if _is_int(fi) and fi > 0 and _is_int(save) and save > 0 and fi % save:
        checks.append(f"config.train.fid_interval={fi} must be a multiple of config.train.save_interval={save} (the "
                      "best-FID checkpoint is evaluated at the end), or 0 for no in-training FID")
    if config.get('compile', 'none') not in COMPILE_MODES:
        checks.append(f"config.compile={config.get('compile')!r}; expected one of {', '.join(map(repr, COMPILE_MODES))}")
    if tc.get('mode') not in ('cond', 'uncond'):
        checks.append(f"config.train.mode={tc.get('mode')!r}; expected 'cond' or 'uncond'")
    opt = config.get('optimizer')
    if opt is not None:
        checks += [
            real('config.optimizer.lr', opt.get('lr', 2e-4), lambda v: v > 0, 'a number > 0'),
            real('config.optimizer.weight_decay', opt.get('weight_decay', 0.03), lambda v: v >= 0, '>= 0'),
            real('config.optimizer.eps', opt.get('eps', 1e-8), lambda v: v > 0, 'a number > 0'),
        ]
        if opt.get('fused', True) not in (True, False):
            checks.append(f"config.optimizer.fused={opt.get('fused')!r}: must be True or False")
        betas = opt.get('betas', (0.9, 0.999))
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in betas)):
            checks.append(f"config.optimizer.betas={betas!r}: must be two numbers in [0, 1)")
    sched = config.get('lr_scheduler')
    if sched is not None:
        checks.append(integer('config.lr_scheduler.warmup_steps', sched.get('warmup_steps', 0), 0))
    sample = config.get('sample')
    if sample is not None:
        checks += [integer('config.sample.intermediate_n_samples',
                           sample.get('intermediate_n_samples', INTERMEDIATE_N_SAMPLES), 2),
                   integer('config.sample.n_samples', sample.get('n_samples', 1), 1)]
        path = sample.get('inception_path')
        if path is not None and not isinstance(path, str):
            checks.append(f"config.sample.inception_path={path!r}: must be a file path (or None: pytorch-fid's cache)")
    yield from (c for c in checks if c)
    yield from _section_problems(config)


def _section_problems(config):
    """What the readers of the other sections refuse: unknown top-level keys, config.sample, config.dataset."""
    for check in (lambda: check_top_level_keys(config), lambda: SamplingSpec.from_config(config),
                  lambda: check_dataset_config(**config.dataset)):
        try:
            check()
        except (ValueError, KeyError, AttributeError) as e:
            yield str(e)


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
        raise ConfigError(f"config.train.batch_size: {e}") from None
