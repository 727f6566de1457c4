"""The EMA copy and update, and the EMA over a parameter layout, in one process (the sharded layouts run in tests/test_train_sharded.py)."""
import torch

from libs.training.ema import EMA, ema_update, make_ema
from libs.training.sharding import ParamLayout


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def _layout(model):
    return ParamLayout('replicated', model, model, {n: p.shape for n, p in model.named_parameters()}, 0, 1)


def test_update_full_state_and_reload():
    model = _model()
    layout = _layout(model)
    ema = EMA(layout, module=make_ema(model))
    before = {k: v.clone() for k, v in ema.full_state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(0.9)
    after = ema.full_state_dict()
    assert list(after) == ['0.weight', '0.bias', '1.weight', '1.bias']
    for name, p in model.named_parameters():
        assert torch.allclose(after[name], 0.9 * before[name] + 0.1 * p.detach())
    assert ema.module() is ema.module() and not ema.module().training          # unsharded: the EMA module itself
    other = EMA(layout, module=make_ema(_model()))
    other.load_full_state_dict(after)
    assert all(torch.equal(a, b) for a, b in zip(other.full_state_dict().values(), after.values()))


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
