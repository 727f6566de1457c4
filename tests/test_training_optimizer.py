"""AdamW set-up, the 'customized' warm-up, and the EMA update."""
import pytest
import torch

from libs.training.optimizer import ema_update, make_ema, make_lr_scheduler, make_optimizer


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


def test_ema_update_and_copy():
    model = torch.nn.Linear(3, 3)
    ema = make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema_update(ema, model, decay=0.9)
    for b, p, e in zip(before, model.parameters(), ema.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)


@pytest.mark.parametrize('fn, kwargs, match', [
    (make_optimizer, dict(name='lion'), "'lion'"),
    (make_lr_scheduler, dict(name='cosine'), "'cosine'"),
])
def test_unsupported_names(fn, kwargs, match):
    arg = [torch.nn.Parameter(torch.zeros(1))] if fn is make_optimizer else torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1)
    with pytest.raises(ValueError, match=match):
        fn(arg, **kwargs)
