"""Atomic checkpoints: layout, several writers, pruning, skipping damaged folders, refusing unusable ones."""
import os

import pytest
import torch

from libs.training.checkpoint import (FILES, CheckpointError, DamagedCheckpoint, checkpoint_bytes, commit,
                                     latest_resumable, list_checkpoints, load_checkpoint, load_latest_checkpoint,
                                     read_file, save_checkpoint, staging_dir, write_files)


class NotATensor:
    """Stands for an object a library pickles into its state (DeepSpeed's LossScaler did)."""

    def __init__(self):
        self.cur_scale = 1.0


def _states(step):
    return {'nnet.pth': {'w': torch.full((2,), float(step))}, 'nnet_ema.pth': {'w': torch.zeros(2)},
            'optimizer.pth': {'state': {}}, 'lr_scheduler.pth': {'last_epoch': step}, 'step.pth': step,
            'rng.pth': {'world_size': 1, 'data': [torch.Generator().get_state()]}}


def test_layout_and_newest_first(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(str(tmp_path), step, _states(step))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [5, 10, 15]
    assert sorted(os.listdir(tmp_path / '15.ckpt')) == sorted(FILES)
    step, states = load_latest_checkpoint(str(tmp_path))
    assert step == 15 and torch.equal(states['nnet.pth']['w'], torch.full((2,), 15.0))


def test_no_checkpoint_means_step_zero(tmp_path):
    assert load_latest_checkpoint(str(tmp_path / 'none')) == (0, None)


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


def test_a_truncated_empty_or_foreign_file_is_damage_named_with_its_problem(tmp_path):
    save_checkpoint(str(tmp_path), 2, _states(2))
    path = tmp_path / '2.ckpt' / 'nnet.pth'
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DamagedCheckpoint, match=rf'^{path}: is truncated \(40 bytes; the end of its zip archive is '
                                                r'missing\)'):
        read_file(str(tmp_path / '2.ckpt'), 'nnet.pth')
    path.write_bytes(b'')
    with pytest.raises(DamagedCheckpoint, match=rf'^{path}: is empty \(0 bytes\), not a torch file'):
        read_file(str(tmp_path / '2.ckpt'), 'nnet.pth')
    path.unlink()
    with pytest.raises(DamagedCheckpoint, match=rf'^{path}: missing'):
        read_file(str(tmp_path / '2.ckpt'), 'nnet.pth')


def test_the_size_estimate_bounds_what_torch_save_writes(tmp_path):
    weights = {f'layer{i}.weight': torch.randn(16 + i, 8) for i in range(40)}
    big = torch.randn(1000, 100)
    states = {'nnet.pth': weights, 'views.pth': {'a': big[:10], 'b': big[10:]}, 'step.pth': 7}
    write_files(str(tmp_path), states)
    written = sum(os.path.getsize(tmp_path / name) for name in states)
    assert written <= checkpoint_bytes(states) <= 1.5 * written + len(states) * (16 << 10)
    assert checkpoint_bytes({'views.pth': states['views.pth']}) < big.nbytes + 20_000   # a shared storage counts once


def test_checkpoints_of_which_none_loads_stop_the_run(tmp_path):
    save_checkpoint(str(tmp_path), 7, _states(3))                               # step.pth disagrees
    save_checkpoint(str(tmp_path), 9, _states(9))
    (tmp_path / '9.ckpt' / 'rng.pth').unlink()                                   # a file missing
    with pytest.raises(CheckpointError, match=r'2 checkpoint\(s\) in .* but none can be resumed.*step.pth says 3'):
        load_latest_checkpoint(str(tmp_path))


def test_objects_weights_only_refuses_are_an_error_not_a_skip(tmp_path):
    save_checkpoint(str(tmp_path), 2, _states(2))
    states = _states(4)
    states['optimizer.pth'] = {'loss_scaler': NotATensor()}
    save_checkpoint(str(tmp_path), 4, states)
    with pytest.raises(CheckpointError, match=r'4.ckpt/optimizer.pth: holds objects that torch.load\(weights_only=True\) refuses'):
        load_latest_checkpoint(str(tmp_path))


def test_several_writers_one_rename(tmp_path):
    root = str(tmp_path)
    # process 0 and process 1 write their files into the same staging folder, then process 0 commits
    write_files(staging_dir(root, 5, 'run1'), {k: v for k, v in _states(5).items() if k != 'nnet_ema.pth'} |
                {'optimizer.rank0.pth': {'shard': torch.zeros(1)}})
    assert list_checkpoints(root) == []                                          # nothing visible yet
    write_files(staging_dir(root, 5, 'run1'), {'nnet_ema.pth': {'w': torch.ones(2)},
                                               'optimizer.rank1.pth': {'shard': torch.ones(1)}})
    final = commit(root, 5, 'run1', expect=['optimizer.rank0.pth', 'optimizer.rank1.pth'])
    assert sorted(os.listdir(final)) == sorted([*FILES, 'optimizer.rank0.pth', 'optimizer.rank1.pth'])
    assert sorted(os.listdir(root)) == ['5.ckpt']


def test_commit_refuses_a_folder_a_writer_did_not_finish(tmp_path):
    root = str(tmp_path)
    write_files(staging_dir(root, 5, 'run1'), _states(5) | {'optimizer.rank0.pth': {}})
    with pytest.raises(RuntimeError, match=r"lacks \['optimizer.rank1.pth'\]; not committed"):
        commit(root, 5, 'run1', expect=['optimizer.rank0.pth', 'optimizer.rank1.pth'])
    assert list_checkpoints(root) == []


def test_processes_agree_on_the_newest_step_all_can_read(tmp_path):
    """Process 1's shard of checkpoint 4 is damaged: both processes resume checkpoint 2."""
    root = str(tmp_path)
    for step in (2, 4):
        save_checkpoint(root, step, _states(step) | {'optimizer.rank0.pth': {}, 'optimizer.rank1.pth': {}})
    (tmp_path / '4.ckpt' / 'optimizer.rank1.pth').write_bytes(b'')

    def opener(rank):
        return lambda path: load_checkpoint(path, [*FILES, f'optimizer.rank{rank}.pth'])
    choices = {}
    for rank in (1, 0):                     # each process's own choice, then the agreement (min over processes)
        choices[rank] = latest_resumable(root, opener(rank), agree=lambda s: min([s, *choices.values()]))[0]
    assert choices == {1: 2, 0: 2}


def test_rejects_incomplete_state_sets(tmp_path):
    states = _states(1)
    states.pop('rng.pth')
    with pytest.raises(ValueError, match='at least'):
        save_checkpoint(str(tmp_path), 1, states)
