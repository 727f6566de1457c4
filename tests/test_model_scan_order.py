"""Sequence layout and scan orders against the official index sets (manifests) and the spec."""
import pytest
import torch

from conftest import MANIFESTS, load_manifest
from libs.model.scan_order import layer_patterns, sequence_layout, skip_layers

P, X = 3, 2


def _official_grids():
    for path in MANIFESTS:
        m = load_manifest(path)
        s = m['structure']
        for grid in s['adapter']['grids'].values():
            yield path.stem, s['num_layers'], s['adapter']['pad_token_schedules'][1], grid


@pytest.mark.parametrize('name, num_layers, pad_layout, grid', list(_official_grids()))
def test_matches_official_index_sets(name, num_layers, pad_layout, grid):
    h, w = grid['token_grid']
    patterns = layer_patterns(num_layers, 1)
    assert list(patterns) == [cur for _, cur in grid['scan_pattern_chain']]
    layout = sequence_layout(h, w, P, X, pad_layout, patterns)
    assert layout.seq_len == grid['prepared_sequence_length']
    assert (h + P) * (w + P) - h * w == grid['num_pad_indices']


def test_schedule_examples_from_the_spec():
    assert layer_patterns(25, 1) == (0,) + (-2, 1, -1, 0) * 3 + (-1, 1, -2, 0) * 3
    assert layer_patterns(3, 1) == (0, -2, 0)


@pytest.mark.parametrize('num_layers', [3, 7, 25, 49])
def test_skip_pairs_meet_in_the_same_order(num_layers):
    patterns = layer_patterns(num_layers, 1)
    sources, consumers = skip_layers(num_layers, 1)
    assert len(sources) == len(consumers) == (num_layers - 1) // 2
    for l in consumers:
        assert num_layers - l in sources
        assert patterns[l - 1] == patterns[num_layers - l]   # the merge happens before the re-ordering


def _reference_grid(h, w, pad_layout):
    """Padded grid from the spec's words: image row-major, P pads ending each row, P pad rows;
    rho_pad fills all pad positions in row-major order cyclically with pad 0, 1, 2, ..."""
    grid, pad_count = [], 0
    for i in range(h + P):
        for j in range(w + P):
            if i < h and j < w:
                grid.append(('img', i * w + j))
            else:
                if pad_layout == 'lateral':
                    grid.append(('pad', j - w if i < h else i - h))
                else:
                    grid.append(('pad', pad_count % P))
                pad_count += 1
    return grid


@pytest.mark.parametrize('pad_layout', ['lateral', 'rho_pad'])
@pytest.mark.parametrize('h, w', [(4, 4), (16, 16), (5, 7), (32, 32), (2, 9)])
def test_padded_grid_matches_spec(pad_layout, h, w):
    layout = sequence_layout(h, w, P, X, pad_layout, layer_patterns(7, 1))
    expected = [i if kind == 'img' else h * w + i for kind, i in _reference_grid(h, w, pad_layout)]
    assert layout.grid_source.tolist() == expected
    image_positions = [k for k, (kind, _) in enumerate(_reference_grid(h, w, pad_layout)) if kind == 'img']
    assert layout.image_positions.tolist() == image_positions


def _absolute_order(pattern, h, w):
    Hp, Wp = h + P, w + P
    if pattern in (0, -2):
        order = [i * Wp + j for i in range(Hp) for j in range(Wp)]
    else:
        order = [i * Wp + j for j in range(Wp) for i in range(Hp)]
    if pattern < 0:
        order = order[::-1]
    return list(range(X + P)) + [X + P + k for k in order]


@pytest.mark.parametrize('h, w', [(4, 4), (3, 6)])
def test_layer_gathers_compose_to_the_absolute_orders(h, w):
    patterns = layer_patterns(25, 1)
    layout = sequence_layout(h, w, P, X, 'rho_pad', patterns)
    seq = torch.arange(layout.seq_len)                   # token ids in canonical order
    for l, p in enumerate(patterns):
        if layout.layer_gather[l] is not None:
            seq = seq[layout.layer_gather[l]]
        assert seq.tolist() == _absolute_order(p, h, w), l
    assert seq.tolist() == list(range(layout.seq_len))  # back to row-major after the last layer


def test_layouts_are_cached_per_grid():
    patterns = layer_patterns(7, 1)
    a = sequence_layout(6, 6, P, X, 'lateral', patterns)
    assert sequence_layout(6, 6, P, X, 'lateral', patterns) is a
    assert sequence_layout(6, 8, P, X, 'lateral', patterns) is not a


def test_unknown_pad_layout_is_rejected():
    with pytest.raises(ValueError, match='embedin_lateral'):
        sequence_layout(4, 4, P, X, 'embedin_lateral', layer_patterns(3, 1))


def test_compiled_calls_never_rebuild_the_layout(monkeypatch):
    """Under torch.compile the lookup runs once, eagerly, at trace time; the graph holds the index tensors. A new
    grid is a new trace (the grid is specialised even when Dynamo makes the shapes dynamic)."""
    import libs.model.scan_order as so
    built = []
    init = so.SequenceLayout.__init__
    monkeypatch.setattr(so.SequenceLayout, '__init__', lambda self, *a: (built.append(a[:2]), init(self, *a))[1])
    patterns = layer_patterns(7, 1)

    def reorder(grid):
        layout = sequence_layout(grid.shape[-2], grid.shape[-1], P, X, 'rho_pad', patterns, str(grid.device))
        seq = torch.arange(layout.seq_len).expand(grid.shape[0], -1)
        return seq.index_select(1, layout.layer_gather[1]) + layout.grid_source.sum()

    torch._dynamo.reset()
    explain = torch._dynamo.explain(reorder)(torch.zeros(2, 11, 13))
    assert explain.graph_break_count == 0
    compiled = torch.compile(reorder, fullgraph=True, backend='aot_eager')
    for grid in [torch.zeros(2, 11, 13)] * 3 + [torch.zeros(3, 12, 9), torch.zeros(5, 12, 9), torch.zeros(1, 10, 10)]:
        assert torch.equal(compiled(grid), reorder(grid))
    torch._dynamo.reset()
    assert sorted(set(built)) == sorted(built) == [(10, 10), (11, 13), (12, 9)]       # each grid built once
