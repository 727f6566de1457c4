"""train_ldm_discrete.py under the real sharded launch configs, FSDP1, FSDP2 and DeepSpeed ZeRO-2 (fp32 and bf16),
on two CPU processes (gloo) through tests/sharded_launch.py: train, save, SIGKILL every process after a checkpoint,
resume, and end bit-identical to an uninterrupted run; every checkpoint file loads with weights_only=True."""
import os

import pytest
import torch

from conftest import ROOT
from libs import get_nnet
from libs.training.checkpoint import FILES
from libs.config import load_config
from training_runs import records, run, run_and_kill_after, same_tree, sharded_launcher, state

MODES = ['fsdp1', 'fsdp2', 'zero2', 'zero2_bf16']
SHARDS = ['optimizer.rank0.pth', 'optimizer.rank1.pth']


def _needs(mode):
    if mode.startswith('zero2'):
        pytest.importorskip('deepspeed', reason='the ZeRO path needs the extra: pip install -e ".[deepspeed]"')


def _tiny_model_state():
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.nnet.attention_head_dim, config.nnet.num_layers = 32, 3
    return get_nnet(**config.nnet).state_dict()


def _files_load_with_weights_only(workdir):
    for ckpt in sorted(os.listdir(workdir / 'ckpts')):
        for name in os.listdir(workdir / 'ckpts' / ckpt):
            torch.load(workdir / 'ckpts' / ckpt / name, weights_only=True)      # raises if anything is pickled


@pytest.mark.slow
@pytest.mark.parametrize('mode', MODES)
def test_sharded_run_resumes_bit_exactly_after_sigkill(tmp_path, mode):
    _needs(mode)
    launcher, steps = sharded_launcher(mode), ['--config.train.n_steps=6', '--config.train.save_interval=2']
    straight = tmp_path / 'straight'
    out = run(tmp_path, straight, *steps, launcher=launcher, use_cpu=False)
    assert f'{mode.split("_")[0]}: this process holds' in out.stderr and '0.05M parameters' in out.stderr

    killed = tmp_path / 'killed'
    killed_at = run_and_kill_after(tmp_path, killed, 2, *steps, launcher=launcher, use_cpu=False)
    assert killed_at and killed_at[-1] < 6, killed_at                    # it really died mid-run
    resumed = run(tmp_path, killed, *steps, launcher=launcher, use_cpu=False)
    assert f'resumed from {killed}/ckpts/{killed_at[-1]}.ckpt' in resumed.stderr
    for name in ('nnet.pth', 'nnet_ema.pth', *SHARDS, 'rng.pth', 'lr_scheduler.pth'):
        assert same_tree(state(straight, 6, name), state(killed, 6, name)), name

    # The released layout: full fp32 state_dicts with the model's keys, per-process optimizer shards.
    assert sorted(os.listdir(straight / 'ckpts' / '6.ckpt')) == sorted([*FILES, *SHARDS])
    reference = _tiny_model_state()
    for name in ('nnet.pth', 'nnet_ema.pth'):
        saved = state(straight, 6, name)
        assert list(saved) == list(reference), name
        assert all(saved[k].shape == reference[k].shape and saved[k].dtype == torch.float32 for k in saved), name
    manifest = state(straight, 6, 'optimizer.pth')
    assert manifest == {'sharded_by': mode.split('_')[0], 'world_size': 2, 'shards': SHARDS}
    _files_load_with_weights_only(straight)
    _files_load_with_weights_only(killed)

    [check] = [r for r in records(straight) if 'weight_checksum' in r]
    assert len(check['shard_checksums']) == 2
    assert check['weight_checksum'] == pytest.approx(sum(v.double().sum().item() for v in state(straight, 6, 'nnet.pth').values()))
    if mode.startswith('zero2'):                                       # the module replicas agree
        assert len(set(check['weight_checksums'])) == 1

    again = run(tmp_path, straight, *steps, launcher=launcher, use_cpu=False)   # a finished run, restarted
    assert f'resumed from {straight}/ckpts/6.ckpt' in again.stderr
