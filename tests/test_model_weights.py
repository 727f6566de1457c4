"""Loading released-style weight files: strict, prefix-tolerant, positional table interpolated across grids."""
import math

import pytest
import torch

from libs import get_nnet
from libs.files import UnreadableFile
from libs.model.weights import load_nnet_weights

TINY = dict(name='Mamba_DiT_H_2', attention_head_dim=32, num_layers=3, num_embeds_ada_norm=5)


def _bilinear_reference(grid, out):
    """align_corners=False bilinear resize of an (s, s, D) grid to (out, out, D), by the textbook formula."""
    s = grid.shape[0]

    def taps(o):
        src = max((o + 0.5) * s / out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), s - 1)
        i1 = min(i0 + 1, s - 1)
        return i0, i1, src - i0

    res = torch.empty(out, out, grid.shape[-1])
    for a in range(out):
        r0, r1, lr = taps(a)
        for b in range(out):
            c0, c1, lc = taps(b)
            top = grid[r0, c0] * (1 - lc) + grid[r0, c1] * lc
            bot = grid[r1, c0] * (1 - lc) + grid[r1, c1] * lc
            res[a, b] = top * (1 - lr) + bot * lr
    return res


def test_round_trip_of_a_plain_state_dict(tmp_path):
    src = get_nnet(**TINY, sample_size=8)
    path = tmp_path / 'nnet_ema.pth'
    torch.save(src.state_dict(), path)
    dst = get_nnet(**TINY, sample_size=8, pretrained_path=str(path))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 900.0]), torch.tensor([0, 5])
    with torch.no_grad():
        assert torch.equal(src(x, t, y), dst(x, t, y))


def test_wrapper_prefixes_are_stripped(tmp_path):
    src = get_nnet(**TINY, sample_size=8)
    state = {'module.' + k: v for k, v in src.state_dict().items()}
    dst = load_nnet_weights(get_nnet(**TINY, sample_size=8), state)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_table_from_another_grid_is_interpolated_bilinearly(tmp_path):
    src = get_nnet(**TINY, sample_size=6)                       # 3x3 token table
    with torch.no_grad():
        src.additional_embed.normal_()
    path = tmp_path / 'nnet_ema.pth'
    torch.save(src.state_dict(), path)
    dst = get_nnet(**TINY, sample_size=10, pretrained_path=str(path))   # 5x5 token table
    table = src.additional_embed.detach()
    got = dst.additional_embed.detach()
    assert got.shape == (1, 2 + 25, 32)
    assert torch.equal(got[:, :2], table[:, :2])                # time/class rows unchanged
    expected = _bilinear_reference(table[0, 2:].view(3, 3, 32), 5).view(25, 32)
    assert torch.allclose(got[0, 2:], expected, atol=1e-6)


def test_mismatches_are_listed(tmp_path):
    state = get_nnet(**TINY, sample_size=8).state_dict()
    state.pop('label_emb.weight')
    state['extra.weight'] = torch.zeros(1)
    state['proj_out_2.bias'] = torch.zeros(3)
    with pytest.raises(RuntimeError) as err:
        load_nnet_weights(get_nnet(**TINY, sample_size=8), state)
    msg = str(err.value)
    assert "missing keys (1): ['label_emb.weight']" in msg
    assert "unexpected keys (1): ['extra.weight']" in msg
    assert 'proj_out_2.bias: checkpoint (3,) vs model (16,)' in msg


def test_checkpoint_of_another_width_fails_clearly(tmp_path):
    path = tmp_path / 'nnet.pth'
    torch.save(get_nnet(**{**TINY, 'attention_head_dim': 16}, sample_size=8).state_dict(), path)
    with pytest.raises(RuntimeError, match='shape mismatches'):
        get_nnet(**TINY, sample_size=8, pretrained_path=str(path))


def test_non_state_dict_files_are_rejected(tmp_path):
    path = tmp_path / 'nnet.pth'
    torch.save({'step': 3, 'nnet': {}}, path)
    with pytest.raises(ValueError, match='not a plain state_dict'):
        get_nnet(**TINY, sample_size=8, pretrained_path=str(path))


def test_unreadable_weight_files_are_named(tmp_path):
    path = tmp_path / 'nnet_ema.pth'
    torch.save(get_nnet(**TINY, sample_size=8).state_dict(), path)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) - 100])
    with pytest.raises(UnreadableFile, match=rf'^{path}: is truncated \([\d,]+ bytes; the end of its zip archive is '
                                             r'missing\)'):
        get_nnet(**TINY, sample_size=8, pretrained_path=str(path))
    with pytest.raises(ValueError, match=rf'{tmp_path} is a folder: pass the weights file inside it'):
        get_nnet(**TINY, sample_size=8, pretrained_path=str(tmp_path))
