"""The DiM backbone: forward pass against a from-the-spec reference, call conventions, init, precision."""
import math

import pytest
import torch

from libs import get_nnet
from libs.model.dim import DiM, DiMBlock, ModulatedRMSNorm
from reference_ops import dim_reference, max_rel_err, mixer_reference
from test_model_mixer import mixer_forward_plain

TINY = dict(name='Mamba_DiT_H_2', num_layers=5, num_embeds_ada_norm=10, sample_size=8)


def randomized(model, seed=0):
    """Every parameter random (nothing zero or identity), Mamba-plausible where it matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('A_log'):
                p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=g)))
            elif name.endswith('dt_proj.bias'):
                p.copy_(torch.log(torch.expm1(1e-3 + 0.1 * torch.rand(p.shape, generator=g))))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() < 2 else 1.5 / math.sqrt(p.shape[-1])))
    return model.eval()


def _inputs(B=2, C=4, H=8, W=8, K=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), torch.tensor([37.0, 803.5])[:B], torch.tensor([3, K])[:B]


@pytest.mark.parametrize('width, layers, pads, hw', [
    (64, 5, 'lateral', (8, 8)),        # D <= 512: one Linear(2D, D) skip
    (64, 5, 'rho_pad', (8, 8)),
    (64, 5, 'rho_pad', (10, 14)),      # another, rectangular grid: table interpolated, w mod 3 != 0
    (520, 3, 'lateral', (4, 4)),       # D > 512: two Linear(D, D) skips
])
def test_forward_matches_the_spec_reference(width, layers, pads, hw):
    model = randomized(get_nnet(**{**TINY, 'num_layers': layers}, attention_head_dim=width,
                                pad_token_schedules=['dec_split', pads]))
    x, t, y = _inputs(H=hw[0], W=hw[1])
    with torch.no_grad():
        out = model(x, t, y)
        ref = dim_reference(model.state_dict(), x, t, y, num_layers=layers, pad_layout=pads)
    assert out.shape == x.shape
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize('schedule', ['official', 'timestep'])
def test_skip_tune_matches_the_spec_reference(schedule):
    model = randomized(get_nnet(**{**TINY, 'num_layers': 7}, attention_head_dim=64, pad_token_schedules=['dec_split', 'rho_pad'],
                                num_patches=[16, 4], is_skip_tune=True, skip_tune_param=(0.82, 1.0),
                                skip_tune_schedule=schedule))
    x, t, y = _inputs()
    with torch.no_grad():
        out = model(x, t, y)
        for b in range(2):
            tt = 1e-3 if schedule == 'official' else t[b].item() / 1000
            ref = dim_reference(model.state_dict(), x[b:b + 1], t[b:b + 1], y[b:b + 1], num_layers=7,
                                pad_layout='rho_pad', skip_tune=(0.82, 1.0, tt))
            assert torch.allclose(out[b:b + 1], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    weights = model.skip_weights(t)
    assert weights[4].flatten().tolist() == [1.0, 1.0]          # bottom skip layer: 1.0
    if schedule == 'official':                                   # constant 0.001: top is 0.99982 at any t
        assert torch.allclose(weights[6].flatten(), torch.tensor([0.99982, 0.99982]))
    else:
        assert torch.allclose(weights[6].flatten(), 1 - 0.18 * t / 1000)


def test_mixer_matches_reference():
    model = randomized(get_nnet(**TINY, attention_head_dim=64))
    mixer = model.transformer_blocks[1].attn1
    x = torch.randn(2, 40, 64)
    sd = {k: v for k, v in model.state_dict().items()}
    with torch.no_grad():
        out, ref = mixer(x), mixer_reference(sd, 'transformer_blocks.1.attn1.', x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_call_conventions():
    model = randomized(get_nnet(**TINY, attention_head_dim=32))
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        a = model(x, torch.full((3,), 250.0), torch.full((3,), 10))
        assert torch.equal(model(x, 250.0), a)                   # scalar t broadcast, y defaults to null class K
        assert torch.equal(model(x, torch.tensor(250.0)), a)
        assert torch.equal(model(x, torch.tensor([250, 250, 250])), a)  # integer steps become floats
        b = model(x, 250.0, torch.tensor([0, 1, 2]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize('args, match', [
    ((torch.randn(2, 3, 8, 8), 1.0), r'x must be \(B, 4, H, W\)'),
    ((torch.randn(2, 4, 7, 8), 1.0), 'divisible by the patch size 2'),
    ((torch.randn(2, 4, 8, 8), torch.ones(3)), r'timesteps must be \(B,\)'),
    ((torch.randn(2, 4, 8, 8), 1.0, torch.zeros(3, dtype=torch.long)), r'y must be \(B,\)'),
])
def test_bad_inputs_are_named(args, match):
    model = get_nnet(**TINY, attention_head_dim=32)
    with pytest.raises(ValueError, match=match):
        model(*args)


@pytest.mark.parametrize('hw', [(2, 2), (6, 4), (12, 12)])
def test_runs_at_any_grid(hw):
    model = randomized(get_nnet(**TINY, attention_head_dim=32))
    out = model(torch.randn(1, 4, *hw), 10.0)
    assert out.shape == (1, 4, *hw) and torch.isfinite(out).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomized(get_nnet(**TINY, attention_head_dim=32)).train()
    x, t, y = _inputs()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_keeps_the_stream_in_fp32():
    model = randomized(get_nnet(**TINY, attention_head_dim=64))
    seen = []
    for block in model.transformer_blocks:
        block.register_forward_hook(lambda m, inp, out: seen.append((inp[0].dtype, out.dtype)))
        block.norm1.register_forward_hook(lambda m, inp, out: seen.append((out.dtype,)))
    x, t, y = _inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x, t, y)
    with torch.no_grad():
        ref = model(x, t, y)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(d == torch.float32 for entry in seen for d in entry)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_initialisation_follows_the_official_code():
    model = get_nnet('Mamba_DiT_S_2', attention_head_dim=256, num_layers=9, num_embeds_ada_norm=10)
    named = dict(model.named_parameters())
    for name, p in named.items():
        if name.endswith('.bias') and 'smoother' not in name and 'pos_embed' not in name and 'conv1d' not in name:
            assert (p == 0).all() == (not name.endswith('dt_proj.bias')), name
    for name in ('label_emb.weight', 'adaln_single.emb.class_embedder.embedding_table.weight',
                 'adaln_single.emb.timestep_embedder.linear_1.weight', 'adaln_single.emb.timestep_embedder.linear_2.weight'):
        assert abs(named[name].std().item() - 0.02) < 0.002, name
    assert (model.additional_embed == 0).all()
    mixer = model.transformer_blocks[3].attn1
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1.0, 17.0)).expand(512, 16))
    assert (mixer.D == 1).all()
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert mixer.dt_proj.weight.abs().max() <= 16 ** -0.5             # U(+-dt_rank^-0.5), dt_rank = 256/16
    bound = 1 / math.sqrt(512)                                # kaiming_uniform(a=sqrt(5)) bound, then / sqrt(L)
    assert mixer.out_proj.weight.abs().max() <= bound / 3 and mixer.out_proj.weight.abs().max() > 0.9 * bound / 3
    assert abs(model.transformer_blocks[0].scale_shift_table.std().item() - 1 / 16) < 0.01
    assert abs(model.a4m_adapter.pad_token.std().item() - 0.02) < 0.005
    assert (model.transformer_blocks[0].norm1.norm.weight == 1).all()
    assert model.proj_out_2.weight.abs().max() > 0                 # no zero-init of the output layer


def test_model_rejects_invalid_depth_directly():
    with pytest.raises(ValueError, match='num_layers must be odd'):
        DiM(width=32, depth=4, in_channels=4, patch_size=2, num_classes=10, table_grid=4)


def _block_forward_plain(self, u, mod, skip=None, gather=None, recompute=True):
    """DiMBlock.forward as one straight pass with the plain norm and mixer: the numerical reference."""
    if skip is not None:
        u = self.merge_skip(u, skip).float()
    if gather is not None:
        u = u.index_select(1, gather)
    shift, scale, gate = (self.scale_shift_table + mod).unbind(1)
    n = self.norm1.norm(u) * (1 + scale[:, None].float()) + shift[:, None].float()
    out = mixer_forward_plain(self.attn1, n)
    return u + (1 + gate[:, None].float()) * out.float()


def _norm_forward_plain(self, x, shift, scale, recompute=True):
    return self.norm(x) * (1 + scale[:, None].float()) + shift[:, None].float()


def _loss_and_grads(model, x, t, y, autocast):
    model.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize('autocast', [False, True])
def test_model_matches_the_plain_forward(monkeypatch, autocast):
    model = randomized(get_nnet(**TINY, attention_head_dim=64)).train()
    x, t, y = _inputs()
    out, grads = _loss_and_grads(model, x, t, y, autocast)
    monkeypatch.setattr(DiMBlock, 'forward', _block_forward_plain)
    monkeypatch.setattr(ModulatedRMSNorm, 'forward', _norm_forward_plain)
    ref, ref_grads = _loss_and_grads(model, x, t, y, autocast)
    if autocast:        # bf16 GEMM paths may round differently for another layout (identical on this CPU)
        assert max_rel_err(out, ref) < 1e-2
        return
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):   # the plain mixer lays dt out otherwise: its gradients sum in another order
        assert max_rel_err(a, b) < 1e-6


@pytest.mark.parametrize('autocast', [False, True])
def test_recompute_and_checkpointing_change_no_bit_of_the_gradients(autocast):
    model = randomized(get_nnet(**TINY, attention_head_dim=64)).train()
    x, t, y = _inputs()
    runs = []
    for ckpt, recompute in ((False, True), (True, True), (False, False)):
        model.gradient_checkpointing, model.recompute = ckpt, recompute
        runs.append(_loss_and_grads(model, x, t, y, autocast))
    (ref, ref_grads), *others = runs
    for out, grads in others:
        assert torch.equal(out, ref)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
