"""The Mamba mixer: the numbers of a plain forward pass, what it keeps for backward, the layouts it scans."""
import math

import pytest
import torch
import torch.nn.functional as F

import libs.model.mixer as mamba_mixer
from libs.model.mixer import MambaMixer
from libs.model.memory_estimate import SavedBytes
from libs.scan import causal_conv1d, selective_scan
from reference_ops import max_rel_err


def mixer_forward_plain(mixer, u):
    """The mixer as one straight forward pass (nothing recomputed, dt not made contiguous): the numerical reference."""
    x, z = mixer.in_proj(u).transpose(1, 2).chunk(2, dim=1)
    x = causal_conv1d(x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation='silu')
    dt, B, C = mixer.x_proj(x.transpose(1, 2)).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = F.linear(dt, mixer.dt_proj.weight).transpose(1, 2)
    y = selective_scan(x, dt, -torch.exp(mixer.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                       mixer.D.float(), z, delta_bias=mixer.dt_proj.bias.float(), delta_softplus=True)
    return mixer.out_proj(y.transpose(1, 2))


def random_mixer(width, seed=0):
    torch.manual_seed(seed)
    mixer = MambaMixer(width)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if p.dim() == 2 and name != 'A_log':
                p.normal_(0, 1.5 / math.sqrt(p.shape[-1]))
            elif name == 'conv1d.weight':
                p.normal_(0, 0.5)
    return mixer


def _grads(mixer, fn, u, gout, autocast):
    mixer.zero_grad()
    u = u.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = fn(u)
    (out.float() * gout).sum().backward()
    return out.detach(), [u.grad] + [p.grad.clone() for p in mixer.parameters()]


@pytest.mark.parametrize('autocast', [False, True])
@pytest.mark.parametrize('width, L', [(64, 40), (520, 54)])
def test_matches_the_forward_before_recompute(width, L, autocast):
    mixer = random_mixer(width)
    u, gout = torch.randn(2, L, width), torch.randn(2, L, width)
    out, grads = _grads(mixer, mixer, u, gout, autocast)
    ref, ref_grads = _grads(mixer, lambda v: mixer_forward_plain(mixer, v), u, gout, autocast)
    if autocast:        # bf16 GEMM paths may round differently for another layout (identical on this CPU)
        assert max_rel_err(out.float(), ref.float()) < 1e-2
        return
    assert torch.equal(out, ref)                                  # forward bit-identical in fp32
    for a, b in zip(grads, ref_grads):   # the plain pass lays dt out otherwise: only the summation order differs
        assert max_rel_err(a, b) < 1e-6


@pytest.mark.parametrize('autocast', [False, True])
def test_recompute_changes_no_bit_of_the_gradients(autocast):
    mixer = random_mixer(96)
    u, gout = torch.randn(2, 50, 96), torch.randn(2, 50, 96)
    out, grads = _grads(mixer, lambda v: mixer(v, recompute=True), u, gout, autocast)
    ref, ref_grads = _grads(mixer, lambda v: mixer(v, recompute=False), u, gout, autocast)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize('autocast, e', [(False, 4), (True, 2)])
@pytest.mark.parametrize('width', [64, 520])
def test_keeps_only_its_input_xz_and_the_out_proj_input(width, autocast, e):
    mixer, L, Di = random_mixer(width), 37, 2 * width
    saved = {}
    for batch in (1, 3):
        u = torch.randn(batch, L, width, requires_grad=True)
        with SavedBytes(mixer) as meter, torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            mixer(u)
        saved[batch] = meter.bytes
    # in_proj input (e D), xz (2 e Di), out_proj input (e Di), per token
    assert saved[3] - saved[1] == 2 * L * (e * width + 2 * e * Di + e * Di)


def test_without_recompute_it_keeps_far_more():
    mixer, L = random_mixer(64), 37
    saved = {}
    for recompute in (True, False):
        with SavedBytes(mixer) as meter:
            mixer(torch.randn(2, L, 64, requires_grad=True), recompute=recompute)
        saved[recompute] = meter.bytes
    assert saved[False] > 3 * saved[True]


def test_scan_gets_dt_unit_stride_along_the_sequence(monkeypatch):
    seen = {}

    def spy(u, delta, A, B, C, D=None, z=None, **kwargs):
        seen.update(u=u, delta=delta, z=z)
        return selective_scan(u, delta, A, B, C, D, z, **kwargs)
    monkeypatch.setattr(mamba_mixer, 'selective_scan', spy)
    mixer = random_mixer(64)
    mixer(torch.randn(3, 29, 64))
    assert seen['delta'].shape == (3, 128, 29) and seen['delta'].is_contiguous()   # W @ dt^T: (b, d, l) dense
    assert seen['u'].is_contiguous() and seen['z'].stride(1) == 1                  # conv output; z a view of xz
