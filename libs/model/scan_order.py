"""Token layout of DiM's 1-D sequence and its per-layer scan orders, as cached index tensors.

Sequence fed to the blocks (official layout, docs/architecture.md §3):
    [ X extra tokens (time, class) | P separator pads | padded grid G of (h+P) x (w+P) tokens ]
G holds the h x w image tokens row-major, each row followed by P pad tokens, then P rows of pads.
Only G is re-ordered between layers; the extras and separators keep their positions.
"""
import functools
import operator

import torch

__all__ = ['PATTERNS', 'PAD_LAYOUTS', 'layer_patterns', 'skip_layers', 'SequenceLayout', 'sequence_layout']

# Scan patterns of the padded grid: 0 row-major, -2 reversed row-major,
# 1 column-major, -1 reversed column-major. A layer's pattern cycles through this list.
PATTERNS = (0, -2, 1, -1)
PAD_LAYOUTS = ('lateral', 'rho_pad')


def skip_layers(num_layers, encoder_start):
    """(sources, consumers): layer ids whose output is pushed as a long skip, and those that pop one.

    Consumer l pops the skip of source num_layers - l (a stack).
    """
    half = (num_layers - encoder_start) // 2
    sources = list(range(encoder_start, encoder_start + half))
    consumers = list(range(num_layers - half, num_layers))
    return sources, consumers


def layer_patterns(num_layers, encoder_start):
    """Scan pattern of every layer: the official schedule (docs/architecture.md §4).

    Stem layers use 0; the encoder half walks PATTERNS forward, the decoder half walks it back
    (so every skip pair meets in the same order); the last layer is row-major again.
    """
    mid = encoder_start + (num_layers - encoder_start) // 2
    out = []
    for l in range(num_layers):
        if l < encoder_start:
            step = 0
        elif l < mid:
            step = l - encoder_start + 1
        else:
            step = 2 * mid - encoder_start - 1 - l
        out.append(PATTERNS[step % len(PATTERNS)])
    out[-1] = 0
    return tuple(out)


def _grid_order(pattern, Hp, Wp):
    """Positions of the row-major padded grid (Hp x Wp) visited by `pattern`."""
    rows = torch.arange(Hp * Wp).view(Hp, Wp)
    order = {0: rows, -2: rows, 1: rows.t(), -1: rows.t()}[pattern].flatten()
    return order.flip(0) if pattern < 0 else order


class SequenceLayout:
    """Index tensors for one token grid (h, w); build through `sequence_layout` (cached).

    grid_source (Gh*Gw,): for each padded-grid position, its source in cat([image tokens (h*w), pads (P)]).
    image_positions (h*w,): where the image tokens sit in the row-major padded grid.
    layer_gather[l]: index over the whole sequence taking layer l-1's order to layer l's, or None.
    """

    def __init__(self, h, w, pad_len, n_extra, pad_layout, patterns):
        if pad_layout not in PAD_LAYOUTS:
            raise ValueError(f"pad layout must be one of {PAD_LAYOUTS}, got {pad_layout!r}")
        P = pad_len
        Hp, Wp = h + P, w + P
        i = torch.arange(Hp).view(Hp, 1).expand(Hp, Wp)
        j = torch.arange(Wp).view(1, Wp).expand(Hp, Wp)
        image = (i < h) & (j < w)
        source = torch.where(image, i * w + j, h * w + (j - w))        # rows < h end with pads 0..P-1
        bottom = i >= h
        if pad_layout == 'lateral':
            bottom_pad = i - h                                         # pad i-h along the whole row
        else:
            bottom_pad = ((i - h) * w + j) % P                         # pads cycle on through the bottom rows
        source = torch.where(bottom, h * w + bottom_pad, source)
        self.grid_source = source.flatten()
        self.image_positions = (i * Wp + j)[image]
        self.seq_len = n_extra + P + Hp * Wp

        head = torch.arange(n_extra + P)
        orders = {}
        for p in set(patterns) | {0}:
            orders[p] = torch.cat([head, n_extra + P + _grid_order(p, Hp, Wp)])
        self.layer_gather = []
        prev = 0
        for p in patterns:
            if p == prev:
                self.layer_gather.append(None)
            else:
                inverse = torch.empty_like(orders[prev])
                inverse[orders[prev]] = torch.arange(self.seq_len)
                self.layer_gather.append(inverse[orders[p]])
            prev = p
        if prev != 0:
            raise ValueError('the last layer must scan row-major (pattern 0)')

    def to(self, device):
        out = object.__new__(SequenceLayout)
        out.__dict__.update(self.__dict__)
        out.grid_source = self.grid_source.to(device)
        out.image_positions = self.image_positions.to(device)
        out.layer_gather = [None if g is None else g.to(device) for g in self.layer_gather]
        return out


@functools.lru_cache(maxsize=64)
def _cpu_layout(h, w, pad_len, n_extra, pad_layout, patterns):
    return SequenceLayout(h, w, pad_len, n_extra, pad_layout, patterns)


@functools.lru_cache(maxsize=64)
def _device_layout(h, w, pad_len, n_extra, pad_layout, patterns, device):
    layout = _cpu_layout(h, w, pad_len, n_extra, pad_layout, patterns)
    return layout if device == 'cpu' else layout.to(device)


@torch.compiler.assume_constant_result
def _cached_layout(h, w, pad_len, n_extra, pad_layout, patterns, device):
    return _device_layout(h, w, pad_len, n_extra, pad_layout, patterns, device)


def sequence_layout(h, w, pad_len, n_extra, pad_layout, patterns, device='cpu'):
    """Cached `SequenceLayout` for grid (h, w) on `device` (a string, e.g. 'cuda:0').

    Under torch.compile the lookup runs eagerly while tracing (the grid is specialised: h, w become ints) and the
    index tensors enter the graph as inputs: the Python that builds them never runs in, or breaks, a compiled forward.
    """
    return _cached_layout(operator.index(h), operator.index(w), pad_len, n_extra, pad_layout, patterns, device)
