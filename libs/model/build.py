"""`get_nnet(**config.nnet)`: the official config keys -> a `DiM`, validated.

The name picks the family (size presets below); the keyword arguments override every size, as in
the official code. Keys the official configs carry without effect are accepted; any other key, or a
value we do not support, is an error that names it.
"""
import math

from .dim import DiM
from .weights import load_nnet_weights

__all__ = ['PRESETS', 'get_nnet', 'build_nnet', 'dim_arguments', 'official_arguments']

PRESETS = {
    'Mamba_DiT_S_2': dict(num_attention_heads=1, attention_head_dim=512, num_layers=25, patch_size=2),
    'Mamba_DiT_L_2': dict(num_attention_heads=16, attention_head_dim=64, num_layers=49, patch_size=2),
    'Mamba_DiT_H_2': dict(num_attention_heads=1, attention_head_dim=1536, num_layers=49, patch_size=2),
}

DEFAULTS = dict(
    in_channels=4, out_channels=None, num_embeds_ada_norm=1000, sample_size=32, num_patches=None,
    mamba_d_state=16, mamba_d_conv=3, mamba_expand=2, encoder_start_blk_id=1,
    pad_token_schedules=('dec_split', 'lateral'), multi_times=1,
    is_skip_tune=False, skip_tune_param=(0.82, 1.0), skip_tune_schedule='official',
)

# Official keys whose only supported value is the one every official config uses.
FIXED = dict(
    norm_type='ada_norm_single', mamba_type='enc', is_uconnect=True, no_ff=True, is_extra_tokens=True,
    rms=True, use_pad_token=True, use_a4m_adapter=True, use_adapter_modules=True,
    pos_encoding_type='learnable', scan_pattern_len=3, pattern_type='base', is_absorb=False,
    is_random_patterns=False, is_freeu=False, drop_path_rate=0.0,
)

# Official keys that the official model reads but that change nothing (docs/architecture.md §2).
IGNORED = frozenset([
    'activation_fn', 'attention_bias', 'norm_elementwise_affine', 'use_bidirectional_rnn', 'nested_order',
    'use_conv1d', 'sequence_schedule', 'sub_sequence_schedule', 'kv_as_one_token_idx',
    'num_2d_enc_dec_layers', 'is_align_exchange_q_kv', 'freeu_param',
])

PAD_SCHEDULES = {('dec_split', 'lateral'): 'lateral', ('dec_split', 'rho_pad'): 'rho_pad'}
SKIP_TUNE_SCHEDULES = ('official', 'timestep')


def _square_side(n, what):
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{what}={n} is not a square number of tokens")
    return s


def build_nnet(name, **kwargs):
    """A freshly initialised DiM from official-style keyword arguments."""
    return DiM(**dim_arguments(name, **kwargs))


def official_arguments(name, **kwargs):
    """Every official keyword argument that shapes the network, checked: the preset of `name` and the defaults
    completed by `kwargs`; the keys without effect (FIXED at their only value, IGNORED) left out."""
    if name not in PRESETS:
        raise ValueError(f"unknown network name {name!r}; expected one of {sorted(PRESETS)}")
    known = set(PRESETS[name]) | set(DEFAULTS) | set(FIXED) | IGNORED
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown config.nnet key(s) for {name}: {unknown}")
    for key, value in FIXED.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"config.nnet.{key}={kwargs[key]!r} is not supported (only {value!r})")
    return {'name': name, **DEFAULTS, **PRESETS[name],
            **{k: v for k, v in kwargs.items() if k not in FIXED and k not in IGNORED}}


def dim_arguments(name, **kwargs):
    """The `DiM` constructor arguments of official-style keyword arguments; ValueError naming a bad key or value."""
    opt = official_arguments(name, **kwargs)
    width = opt['num_attention_heads'] * opt['attention_head_dim']
    if opt['out_channels'] not in (None, opt['in_channels']):
        raise ValueError(f"config.nnet.out_channels={opt['out_channels']} must equal in_channels="
                         f"{opt['in_channels']} (the network predicts noise shaped like its input)")
    pads = tuple(opt['pad_token_schedules'])
    if pads not in PAD_SCHEDULES:
        raise ValueError(f"config.nnet.pad_token_schedules={list(pads)} is not supported; "
                         f"use one of {[list(k) for k in PAD_SCHEDULES]}")
    p = opt['patch_size']
    if opt['num_patches']:
        sides = [_square_side(n, 'config.nnet.num_patches entry') for n in opt['num_patches']]
        table_grid = sides[0]          # the official table size comes from the first entry
    else:
        if opt['sample_size'] % p:
            raise ValueError(f"config.nnet.sample_size={opt['sample_size']} is not divisible by patch_size={p}")
        table_grid = opt['sample_size'] // p
    if not (isinstance(opt['multi_times'], int) and opt['multi_times'] >= 1):
        raise ValueError(f"config.nnet.multi_times={opt['multi_times']!r} must be a positive integer")
    skip_tune = None
    if opt['is_skip_tune']:
        if opt['skip_tune_schedule'] not in SKIP_TUNE_SCHEDULES:
            raise ValueError(f"config.nnet.skip_tune_schedule={opt['skip_tune_schedule']!r}; "
                             f"expected one of {SKIP_TUNE_SCHEDULES}")
        top, bottom = opt['skip_tune_param']
        skip_tune = (float(top), float(bottom), opt['skip_tune_schedule'])
    return dict(width=width, depth=opt['num_layers'], in_channels=opt['in_channels'], patch_size=p,
                num_classes=opt['num_embeds_ada_norm'], table_grid=table_grid,
                d_state=opt['mamba_d_state'], d_conv=opt['mamba_d_conv'], expand=opt['mamba_expand'],
                encoder_start=opt['encoder_start_blk_id'], pad_layout=PAD_SCHEDULES[pads], skip_tune=skip_tune)


def get_nnet(name, pretrained_path=None, **kwargs):
    """`get_nnet(**config.nnet)`: build the network and, if `pretrained_path` is set, load it (strict,
    the positional table interpolated when its grid differs)."""
    model = build_nnet(name, **kwargs)
    if pretrained_path:
        load_nnet_weights(model, pretrained_path)
    return model
