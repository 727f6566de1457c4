"""Run by tests/test_train_sharded.py under tests/sharded_launch.py (2 processes, the launch's sharded mode):
after one optimiser step on process-dependent data, libs.training.sharding.ParamLayout must assemble exactly the
full weights the libraries assemble themselves, and cut exactly each process's shard back out of them. Prints
'layout ok: <kind>' on every process."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libs import get_nnet  # noqa: E402
from libs.config import load_config  # noqa: E402
from libs.training.optimizer import make_optimizer  # noqa: E402
from libs.training.ema import EMA  # noqa: E402
from libs.training.launch import forward_autocast, make_accelerator, sharding_kind  # noqa: E402
from libs.training.sharding import ParamLayout  # noqa: E402


def main():
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      'configs', 'digits_DiM_tiny.py'))
    config.nnet.attention_head_dim, config.nnet.num_layers, config.train.batch_size = 32, 3, 4
    acc = make_accelerator(config)
    kind, rank = sharding_kind(acc), acc.process_index
    torch.manual_seed(0)
    model = get_nnet(**config.nnet).to(acc.device)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    nnet, opt = acc.prepare(model, make_optimizer(model.parameters(), **config.optimizer))
    g = torch.Generator().manual_seed(rank)
    x, t, y = torch.randn(2, 1, 16, 16, generator=g), torch.rand(2, generator=g) * 1000, torch.tensor([rank, 3])
    with forward_autocast(acc)():
        loss = nnet(x.to(acc.device), t.to(acc.device), y.to(acc.device)).float().pow(2).mean()
    acc.backward(loss)
    opt.step()
    opt.zero_grad()

    layout = ParamLayout(kind, nnet, acc.unwrap_model(nnet), shapes, rank, acc.num_processes)
    full = layout.gather_full(layout.local_tensors(), dst=None)
    assert list(full) == list(shapes)
    for k, (name, local) in enumerate(zip(layout.names, layout.local_tensors())):
        assert torch.equal(layout.take_local(k, full[name]), local.float()), name
    if kind == 'zero2':
        from deepspeed.utils import safe_get_full_fp32_param
        for name, p in zip(layout.names, layout.params):
            assert torch.equal(safe_get_full_fp32_param(p).cpu(), full[name]), name
    library = acc.get_state_dict(nnet)                # may be rank 0 only
    for name, value in library.items():
        expected = full[name].to(value.dtype)         # ZeRO-2 bf16: the module holds the bf16 rounding
        assert torch.equal(value.cpu(), expected), name
    assert rank != 0 or len(library) == len(shapes)
    ema = EMA(layout, build_model=lambda: get_nnet(**config.nnet)).module(dst=None)
    assert all(torch.equal(p.cpu(), full[n]) for n, p in ema.named_parameters())
    print(f'layout ok: {kind}', flush=True)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == '__main__':
    main()
