"""The training loop at GPU speed, checked on CPU: no host sync in a step (counted by tests/host_syncs.py), the
per-step values read once per log interval, the non-finite stop naming its step, and none of it changing the math."""
import math

import pytest
import torch

from conftest import ROOT
from host_syncs import HostSyncCounter, adamw_step_counters
from libs.config import load_config
from libs.training.run_logging import read_metrics
from libs.training.launch import make_accelerator
from libs.training.step import StepValues
from libs.training.trainer import Trainer


def _config(**train_keys):
    config = load_config(str(ROOT / 'configs' / 'digits_DiM_tiny.py'))
    config.nnet.attention_head_dim, config.nnet.num_layers = 32, 3
    config.train.update(dict(batch_size=8, n_steps=8, log_interval=4, save_interval=8, eval_interval=1000,
                             fid_interval=0, keep_ckpts=None), **train_keys)
    return config


def _trainer(config, workdir, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    return Trainer(config, str(workdir), make_accelerator(config))


@pytest.mark.parametrize('workers', [0, 2])
def test_a_training_step_makes_no_host_sync(tmp_path, monkeypatch, workers):
    trainer = _trainer(_config(num_workers=workers), tmp_path / 'run', monkeypatch)
    iteration, next_batch = [0], trainer.data.next_batch

    def counted_next_batch(*args):                                     # a step starts with its batch
        iteration[0] += 1
        return next_batch(*args)

    st = trainer.state
    counter = HostSyncCounter(device_tensors=lambda: [*st.nnet.parameters(), *st.ema.tensors],
                              host_tensors=lambda: adamw_step_counters(st.optimizer),
                              device_generators=lambda: [st.rng.device], tag=lambda: iteration[0])
    trainer.data.next_batch = counted_next_batch
    for owner, name in ((trainer.state, 'save'), (trainer.state, 'replica_record'), (trainer, '_evaluate'),
                        (trainer, '_final_evaluation')):           # checkpoints and sampling: not a step
        setattr(owner, name, counter.pause(getattr(owner, name)))
    with counter:
        trainer.train()
    per_step = {i: [(kind, f'{file.rsplit("/", 1)[-1]}:{line}') for kind, (file, line), tag in counter.events
                    if tag == i] for i in range(1, 9)}
    # steps 2, 3, 5, 6, 7: nothing; the log steps 4 and 8: one read of every value since the last log
    for i in (2, 3, 5, 6, 7):
        assert per_step[i] == [], (i, per_step[i])
    for i in (4, 8):
        assert [kind for kind, _ in per_step[i]] == ['Tensor.tolist'], (i, per_step[i])
        assert per_step[i][0][1].startswith('step.py'), per_step[i]
    # step 1 only: the data fingerprint shown in the log, and the noise schedule copied to the device (once per
    # process: not again if an earlier test of this process copied it)
    first = sorted(per_step[1], key=lambda e: e[1])
    assert first[-1][0] == 'Tensor.tolist' and first[-1][1].startswith('trainer.py'), first
    assert [kind for kind, where in first[:-1]] in ([], ['blocking Tensor.to']), first
    assert all(where.startswith('sde.py') for _, where in first[:-1]), first
    assert adamw_step_counters(trainer.state.optimizer)                  # the exclusion had something to exclude


def test_the_counter_sees_what_syncs():
    x, host, pinned = torch.randn(4), torch.randn(4), torch.randn(4)
    with HostSyncCounter(device_tensors=lambda: [x]) as counter:
        host.sum().item()                                                  # host data: no sync
        pinned.to(x.device, non_blocking=True)
        y = host.to(x.device)                                              # a blocking copy to the device
        y.sum().tolist()                                                   # y is a device tensor now
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]                                                           # boolean mask: data-dependent size
        torch.nonzero(x)
        x.to('cpu')
        x.to('cpu', non_blocking=True)                                     # not counted
        torch.tensor([1.0], device='cpu')
        float(x[0])
        x.tolist()
        x.to(x.device)                                                     # on the device already: nothing
        torch.zeros(2, device=x.device).sum().item()                       # made on the device, read back
    kinds = [kind for kind, _, _ in counter.events]
    assert kinds == ['blocking Tensor.to', 'Tensor.tolist', 'Tensor.item', 'Tensor.__bool__',
                     'aten.index.Tensor with a boolean mask', 'aten.nonzero.default', 'blocking Tensor.to',
                     'torch.tensor(device=...)', 'Tensor.__float__', 'Tensor.tolist', 'Tensor.item']
    assert torch.Tensor.item is torch._C.TensorBase.item                    # everything restored


def test_reading_less_often_changes_no_loss_and_no_weight(tmp_path, monkeypatch):
    runs = {}
    for name, keys in (('every_step', dict(log_interval=1)), ('every_4', dict(log_interval=4, num_workers=2))):
        trainer = _trainer(_config(**keys), tmp_path / name, monkeypatch)
        trainer.train()
        losses = [r['loss'] for r in read_metrics(trainer.metrics.path) if 'loss' in r]
        runs[name] = losses, [t.clone() for t in trainer.state.layout.local_tensors()], \
            [t.clone() for t in trainer.state.ema.tensors]
    (l1, w1, e1), (l4, w4, e4) = runs['every_step'], runs['every_4']
    assert len(l1) == 8 and len(l4) == 2
    assert l4 == [sum(l1[:4]) / 4, sum(l1[4:]) / 4]                      # the same floats, averaged alike
    assert all(torch.equal(a, b) for a, b in zip(w1, w4)) and all(torch.equal(a, b) for a, b in zip(e1, e4))


def test_a_non_finite_loss_is_reported_with_its_step():
    values = StepValues('CKPTS')
    for step, loss in enumerate([1.0, 2.0, float('nan'), float('inf')], start=11):
        values.add(step, torch.tensor(loss), torch.tensor(0.5))
    with pytest.raises(FloatingPointError, match='training loss became nan at step 13; stopping. The last complete '
                                                 'checkpoint in CKPTS is kept'):
        values.read()
    values = StepValues('CKPTS')
    values.add(1, torch.tensor(1.0), None)                                # DeepSpeed reports no norm
    values.add(2, torch.tensor(2.0), torch.tensor(3.0))
    record = values.record(samples_per_step=8)
    assert record['loss'] == 1.5 and record['grad_norm'] == 3.0 and record['samples_per_sec'] > 0
    assert not values.pending and not values.losses


def test_weights_that_became_non_finite_are_not_saved(tmp_path, monkeypatch):
    trainer = _trainer(_config(n_steps=2, save_interval=2), tmp_path / 'run', monkeypatch)
    trainer.state.layout.local_tensors()[0].view(-1)[0] = math.inf
    with pytest.raises(FloatingPointError, match='non-finite values after step 0 .* without saving checkpoint 0'):
        trainer.state.save()
    assert not list((tmp_path / 'run' / 'ckpts').iterdir())
