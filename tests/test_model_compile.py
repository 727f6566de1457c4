"""torch.compile of the whole DiM (libs/model/compile.py): one graph, no breaks, the eager result, forward and backward."""
import logging
import os

import pytest
import torch

import libs.scan as ss
from libs import get_nnet
from libs.model.compile import COMPILE_MODES, check_compile_mode, compile_network
from libs.config import load_config
from libs.scan import cpu as scan_cpu

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'digits_DiM_tiny.py')
needs_kernel = pytest.mark.skipif(not scan_cpu.is_available(), reason='compiled CPU scan kernel not built')


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv('DIM_SCAN_BACKEND', raising=False)
    ss.reset()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    ss.reset()


def digits_net(**overrides):
    """The digits demo network (configs/digits_DiM_tiny.py), optionally shrunk."""
    kwargs = load_config(CONFIG).nnet.to_dict()
    kwargs.pop('pretrained_path', None)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return get_nnet(**kwargs)


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.rand(n, generator=g) * 1000, torch.randint(0, 11, (n,),
                                                                                                       generator=g)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def fwd_bwd(net, module, inputs):
    net.zero_grad(set_to_none=True)
    out = module(*inputs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def assert_matches_eager(net, compiled, inputs, tol=1e-5, sincos_tol=1e-5):
    """Output and every parameter gradient within `tol` (relative to each tensor's max). The timestep embedder's
    first layer is fed cos/sin of t * freq (arguments up to 1000 rad, where fp32 sin/cos implementations differ by
    |x| * 2^-24 ~ 6e-5): it gets `sincos_tol`."""
    out_c, grads_c = fwd_bwd(net, compiled, inputs)
    out_e, grads_e = fwd_bwd(net, net, inputs)
    assert rel(out_c, out_e) < tol
    for name in grads_e:
        bound = sincos_tol if name.startswith('adaln_single.emb.timestep_embedder.linear_1') else tol
        assert rel(grads_c[name], grads_e[name]) < bound, name


def test_modes_are_validated():
    assert check_compile_mode('default') == 'default'
    for bad in ('fast', True, None, 'max_autotune'):
        with pytest.raises(ValueError, match="config.compile must be one of 'none', 'default'"):
            check_compile_mode(bad)
    net = digits_net(num_layers=3, attention_head_dim=16)
    assert compile_network(net, 'none') is net
    with pytest.raises(ValueError, match='CUDA graphs.*not cpu'):
        compile_network(net, 'reduce-overhead')
    assert set(COMPILE_MODES) == {'none', 'default', 'max-autotune', 'reduce-overhead'}


@needs_kernel
def test_digits_model_traces_as_one_graph():
    """Before: 21 graph breaks on this model (ctypes call per layer, the backend log, the layout lru_cache)."""
    net = digits_net()
    explain = torch._dynamo.explain(net)(*batch(2))
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    with torch.no_grad():
        explain = torch._dynamo.explain(net)(*batch(2))
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


@needs_kernel
def test_compile_network_gives_the_eager_result(monkeypatch, caplog):
    """compile_network's real torch.compile call (fullgraph=True), run with the aot_eager backend so that Dynamo,
    AOTAutograd and the scan op's fake / autograd registrations are all exercised in seconds; Inductor: below."""
    seen = {}
    real_compile = torch.compile

    def compile_with_aot_eager(model, **kwargs):
        seen.update(kwargs)
        return real_compile(model, **dict(kwargs, mode=None), backend='aot_eager')

    monkeypatch.setattr(torch, 'compile', compile_with_aot_eager)
    net = digits_net(num_layers=3)
    keys = list(net.state_dict())
    with caplog.at_level(logging.INFO):
        compiled = compile_network(net, 'default')
    assert seen == dict(mode=None, fullgraph=True)
    assert any("scan backend 'cpu'" in r.getMessage() for r in caplog.records)
    assert_matches_eager(net, compiled, batch(4))
    assert list(net.state_dict()) == keys                       # no new persistent entries
    assert [k.removeprefix('_orig_mod.') for k in compiled.state_dict()] == keys


@pytest.mark.slow
@needs_kernel
def test_inductor_forward_backward_and_new_batch_sizes():
    """The real Inductor compile of a shrunk digits model: forward + backward to 1e-5, then another batch size
    (the batch dimension turns dynamic), then a no-grad sampling call."""
    net = digits_net(num_layers=3, attention_head_dim=32)
    compiled = compile_network(net, 'default')
    assert_matches_eager(net, compiled, batch(4), sincos_tol=1e-4)
    assert_matches_eager(net, compiled, batch(3, seed=3), sincos_tol=1e-4)
    with torch.no_grad():
        inputs = batch(6, seed=6)
        assert rel(compiled(*inputs), net(*inputs)) < 1e-5


@pytest.mark.slow
@needs_kernel
def test_inductor_bf16_autocast_forward():
    net = digits_net(num_layers=3, attention_head_dim=32).eval()
    compiled = compile_network(net, 'default')
    inputs = batch(4)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out_c, out_e = compiled(*inputs), net(*inputs)
    with torch.no_grad():
        out_32 = net(*inputs)
    assert out_c.dtype == out_e.dtype == torch.float32
    assert rel(out_c, out_e) < 2e-2 and rel(out_c, out_32) < 5e-2     # bf16 GEMMs: both near fp32
