"""Atomic checkpoints: layout, pruning, and skipping of incomplete or corrupt folders."""
import os

import pytest
import torch

from libs.checkpoint import FILES, list_checkpoints, load_latest_checkpoint, save_checkpoint


def _states(step):
    return {'nnet.pth': {'w': torch.full((2,), float(step))}, 'nnet_ema.pth': {'w': torch.zeros(2)},
            'optimizer.pth': {'state': {}}, 'lr_scheduler.pth': {'last_epoch': step}, 'step.pth': step,
            'rng.pth': {'world_size': 1, 'generators': [torch.Generator().get_state()]}}


def test_layout_and_newest_first(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(str(tmp_path), step, _states(step))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [5, 10, 15]
    assert sorted(os.listdir(tmp_path / '15.ckpt')) == sorted(FILES)
    step, states = load_latest_checkpoint(str(tmp_path))
    assert step == 15 and torch.equal(states['nnet.pth']['w'], torch.full((2,), 15.0))


def test_keep_last_n(tmp_path):
    for step in range(1, 6):
        save_checkpoint(str(tmp_path), step, _states(step), keep=2)
    assert sorted(os.listdir(tmp_path)) == ['4.ckpt', '5.ckpt']


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(str(tmp_path), 3, _states(3))
    states = _states(3)
    states['nnet.pth'] = {'w': torch.ones(2)}
    save_checkpoint(str(tmp_path), 3, states)
    assert sorted(os.listdir(tmp_path)) == ['3.ckpt']
    assert torch.equal(load_latest_checkpoint(str(tmp_path))[1]['nnet.pth']['w'], torch.ones(2))


def test_unfinished_and_corrupt_folders_are_skipped(tmp_path, caplog):
    save_checkpoint(str(tmp_path), 2, _states(2))
    save_checkpoint(str(tmp_path), 4, _states(4))
    (tmp_path / '4.ckpt' / 'optimizer.pth').write_bytes(b'\x00garbage')        # corrupt
    os.makedirs(tmp_path / '6.ckpt')                                             # incomplete
    os.makedirs(tmp_path / '.tmp-8-999')                                         # interrupted save
    step, states = load_latest_checkpoint(str(tmp_path))
    assert step == 2 and states['step.pth'] == 2
    assert 'skipping unreadable checkpoint' in caplog.text and '6.ckpt' in caplog.text and '4.ckpt' in caplog.text
    save_checkpoint(str(tmp_path), 8, _states(8))
    assert not (tmp_path / '.tmp-8-999').exists()                                # cleaned by the next save


def test_step_file_must_match_the_folder(tmp_path, caplog):
    save_checkpoint(str(tmp_path), 7, _states(3))
    assert load_latest_checkpoint(str(tmp_path)) == (0, None)


def test_rejects_incomplete_state_sets(tmp_path):
    states = _states(1)
    states.pop('rng.pth')
    with pytest.raises(ValueError, match='exactly'):
        save_checkpoint(str(tmp_path), 1, states)
