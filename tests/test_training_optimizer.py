"""AdamW set-up, the 'customized' warm-up, and the optimizer state made plain for weights_only checkpoints and
restored (the sharded kinds run end to end in tests/test_train_sharded.py)."""
import collections
import io
from types import SimpleNamespace

import pytest
import torch

from libs.training.optimizer import (_zero_objects, _zero_plain, load_optimizer_state, make_lr_scheduler,
                                     make_optimizer, optimizer_state)


def test_warmup_is_linear_then_constant_and_starts_at_zero():
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model.parameters(), lr=1.0, weight_decay=0.03, betas=(0.99, 0.99), eps=1e-15)
    sched = make_lr_scheduler(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]['lr'])     # lr used by this optimiser step
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert opt.param_groups[0]['betas'] == (0.99, 0.99) and opt.param_groups[0]['weight_decay'] == 0.03
    assert len(opt.param_groups) == 1              # every parameter decayed, as the official code


@pytest.mark.parametrize('fn, kwargs, match', [
    (make_optimizer, dict(name='lion'), "'lion'"),
    (make_lr_scheduler, dict(name='cosine'), "'cosine'"),
])
def test_unsupported_names(fn, kwargs, match):
    arg = [torch.nn.Parameter(torch.zeros(1))] if fn is make_optimizer else torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1)
    with pytest.raises(ValueError, match=match):
        fn(arg, **kwargs)


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_replicated_state_is_the_adamw_state_dict():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = _roundtrip(optimizer_state('replicated', opt))
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    load_optimizer_state('replicated', other, state)
    assert torch.equal(other.state_dict()['state'][0]['exp_avg'], opt.state_dict()['state'][0]['exp_avg'])


def test_deepspeed_objects_become_plain_values_and_come_back():
    pytest.importorskip('deepspeed', reason='the ZeRO path needs the extra: pip install -e ".[deepspeed]"')
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    saved = {'loss_scaler': LossScaler(scale=1.0), 'zero_stage': ZeroStageEnum.gradients, 'overflow': False,
             'single_partition_of_fp32_groups': [torch.randn(5)], 'ds_version': '0.19.8',
             'param_slice_mappings': [collections.OrderedDict(w=fragment_address(numel=3, start=2))]}
    with pytest.raises(Exception, match='Weights only load failed'):
        _roundtrip(saved)                                     # what DeepSpeed's state_dict gives as it is
    plain = _roundtrip(_zero_plain(saved))
    assert plain['loss_scaler'] == {'cur_scale': 1.0, 'dynamic': False} and plain['zero_stage'] == 2
    live = SimpleNamespace(loss_scaler=LossScaler(scale=4.0))
    back = _zero_objects(live, plain)
    assert back['loss_scaler'] is live.loss_scaler and live.loss_scaler.cur_scale == 1.0
    assert back['zero_stage'] is ZeroStageEnum.gradients
    assert back['param_slice_mappings'][0]['w'] == fragment_address(numel=3, start=2)
    assert torch.equal(back['single_partition_of_fp32_groups'][0], saved['single_partition_of_fp32_groups'][0])
