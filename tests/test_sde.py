"""Tests for sde.py: schedule, training loss, samplers, guidance (docs/architecture.md §13, §14)."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

import sde

S = sde.SCHEDULE
OFFICIAL_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # diffusers' names
MU, SD = 0.3, 0.5  # the analytic data distribution N(MU, SD^2) per element


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The tensors here are small: intra-op threads only add overhead (a lot of it on a loaded machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bcast(v, x):
    return v.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)


def gaussian_eps(x, timesteps, y=None, block=1):
    """Exact E[eps | x_t] for data that is constant on block x block patches, one N(MU, SD^2) value per patch.

    With x_t = a x0 + s eps: per patch, v = mean(x_t) = a c + s u with u = mean(eps) ~ N(0, 1/b^2), so
    E[u | v] = (s / b^2)(v - a MU) / (a^2 SD^2 + s^2 / b^2), and the within-patch residual is s (eps - u) exactly.
    block=1 is i.i.d. data: E[eps | x_t] = s (x_t - a MU) / (a^2 SD^2 + s^2). Time t = timesteps / 1000 on the
    continuous schedule (abar_n at the integers n).
    """
    a2 = bcast(S.marginal_alpha(timesteps.double() / 1000) ** 2, x)
    a, s = a2.sqrt(), (1 - a2).sqrt()
    if block == 1:
        return s * (x - a * MU) / (a2 * SD**2 + s**2)
    v = F.avg_pool2d(x, block)
    up = lambda u: u.repeat_interleave(block, -2).repeat_interleave(block, -1)  # noqa: E731
    return (x - up(v)) / s + up((s / block**2) * (v - a * MU) / (a2 * SD**2 + s**2 / block**2))


def exact_flow(z, t_end):
    """Exact probability-flow map from x_1 = z to time t_end for N(MU, SD^2) data (an affine map per element)."""
    a0, a1 = S.marginal_alpha(torch.tensor(t_end)).item(), S.marginal_alpha(torch.tensor(1.0)).item()
    s0, s1 = math.sqrt(a0**2 * SD**2 + 1 - a0**2), math.sqrt(a1**2 * SD**2 + 1 - a1**2)
    return a0 * MU + (s0 / s1) * (z - a1 * MU)


class Recorder:
    """Wraps an eps_fn and records every call (inputs and output)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, timesteps, y=None):
        out = self.fn(x, timesteps, y)
        self.calls.append(dict(x=x.clone(), t=timesteps.clone(), y=None if y is None else y.clone(), out=out))
        return out


def noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


#################################################################################
#                                 Schedule                                      #
#################################################################################

def test_schedule_equals_diffusers_scaled_linear():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    # diffusers builds the betas in float32; ours are float64 like the official code, so equal to float32 precision.
    torch.testing.assert_close(S.betas[1:], ref.betas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(S.alphas_cumprod[1:], ref.alphas_cumprod.double(), rtol=2e-6, atol=0)
    assert S.betas.dtype == S.alphas_cumprod.dtype == torch.float64
    assert S.betas.shape == (1001,) and S.betas[0] == 0 and S.alphas_cumprod[0] == 1 and S.snr[0] == math.inf


def test_schedule_documented_values():
    abar, snr = S.alphas_cumprod, S.snr
    assert abar[1].item() == pytest.approx(0.99915, abs=1e-12)
    assert abar[500].item() == pytest.approx(0.277670, abs=5e-7)
    assert abar[1000].item() == pytest.approx(0.0046601, abs=5e-8)
    assert snr[1].item() == pytest.approx(1175.47, abs=5e-3)
    assert snr[1000].item() == pytest.approx(0.0046819, abs=5e-8)
    lam = S.marginal_lambda(torch.tensor([1.0, 0.001]))
    assert lam.tolist() == pytest.approx([-2.682, 3.535], abs=5e-4)


def test_continuous_view():
    k = torch.arange(1001, dtype=torch.float64)
    torch.testing.assert_close(S.marginal_alpha(k / 1000) ** 2, S.alphas_cumprod, rtol=1e-13, atol=0)
    mid = S.marginal_log_alpha((k[:-1] + 0.5) / 1000)  # log alpha is linear between the knots
    torch.testing.assert_close(mid, 0.25 * (S.alphas_cumprod[:-1].log() + S.alphas_cumprod[1:].log()))
    t = torch.linspace(1e-3, 1, 997, dtype=torch.float64)
    torch.testing.assert_close(S.marginal_alpha(t) ** 2 + S.marginal_sigma(t) ** 2, torch.ones_like(t))
    assert (S.marginal_lambda(t).diff() < 0).all()
    torch.testing.assert_close(S.inverse_lambda(S.marginal_lambda(t)), t, rtol=0, atol=1e-12)


#################################################################################
#                               Training loss                                   #
#################################################################################

def test_loss_formula():
    x0 = noise(6, 3, 4, 4)
    rec = Recorder(lambda x, t, y: 0.5 * x)
    y = torch.arange(6)
    loss = sde.diffusion_loss(rec, x0, y=y, generator=torch.Generator().manual_seed(3))
    (call,) = rec.calls
    n = call["t"]
    assert loss.shape == (6,) and torch.equal(call["y"], y)
    assert n.dtype == torch.float32 and torch.equal(n, n.round()) and n.min() >= 1 and n.max() <= 1000
    abar = bcast(S.alphas_cumprod[n.long()], x0)
    eps = (call["x"] - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(loss, (0.5 * call["x"] - eps).pow(2).mean(dim=(1, 2, 3)))
    assert eps.std().item() == pytest.approx(1.0, abs=0.2)  # the recovered noise is the drawn N(0, I) noise

    perfect = lambda x, t, y: (x - bcast(S.alphas_cumprod[t.long()], x).sqrt() * x0) / (  # noqa: E731
        1 - bcast(S.alphas_cumprod[t.long()], x)).sqrt()
    assert sde.diffusion_loss(perfect, x0).max().item() < 1e-20


def test_loss_generator_reproducible_and_uniform_steps():
    x0 = torch.zeros(40000, 1)
    state = torch.get_rng_state()
    rec1, rec2 = Recorder(lambda x, t, y: x), Recorder(lambda x, t, y: x)
    l1 = sde.diffusion_loss(rec1, x0, generator=torch.Generator().manual_seed(7))
    l2 = sde.diffusion_loss(rec2, x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched when a generator is given
    assert torch.equal(l1, l2) and torch.equal(rec1.calls[0]["t"], rec2.calls[0]["t"])
    n = rec1.calls[0]["t"]
    assert n.min() == 1 and n.max() == 1000 and len(n.unique()) == 1000
    assert n.mean().item() == pytest.approx(500.5, abs=6.0)  # 4 standard errors


def test_loss_timesteps_stay_fp32_under_bf16_autocast():
    rec = Recorder(lambda x, t, y: x.float() * 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sde.diffusion_loss(rec, torch.zeros(5000, 2, dtype=torch.bfloat16),
                                  generator=torch.Generator().manual_seed(0))
    n = rec.calls[0]["t"]
    assert n.dtype == torch.float32 and loss.dtype == torch.float32
    assert (n > 256).any() and torch.equal(n, n.round()) and (n % 2 == 1).any()  # 257, 513, ... not rounded


#################################################################################
#                         DPM-Solver: grid and exactness                        #
#################################################################################

def test_dpm_solver_grid():
    t, orders = sde.dpm_solver_grid(50)
    assert t.dtype == torch.float64 and len(t) == 51 and t[0] == 1 and t[-1].item() == pytest.approx(1e-3, abs=1e-15)
    assert [round(v, 5) for v in (t[1].item(), t[2].item(), t[49].item())] == [0.98002, 0.96004, 0.02098]
    assert orders == [3] * 16 + [2]
    for steps in range(1, 61):
        assert sum(sde.dpm_solver_grid(steps)[1]) == steps


@pytest.mark.parametrize("guidance", [0.0, 0.4])
def test_dpm_solver_nfe_and_times(guidance):
    rec = Recorder(lambda x, t, y: gaussian_eps(x, t))
    z, y = noise(3, 4, 2, 2), torch.tensor([1, 2, 3])
    sde.sample(rec, z, "dpm_solver", 50, y=y, scale=guidance, null_class=10)
    assert len(rec.calls) == 50
    t, _ = sde.dpm_solver_grid(50)
    for call, tk in zip(rec.calls, t[:50]):  # one call per grid point 0..49, in order, at 1000 t
        assert call["x"].shape[0] == (6 if guidance else 3)
        assert torch.equal(call["t"], torch.full_like(call["t"], 1000 * tk.item()))


def _ref_schedule():
    """The official NoiseScheduleVP('discrete') in numpy: knots k/1000, k = 1..1000."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    tk, la = np.arange(1, 1001) / 1000, 0.5 * np.cumsum(np.log(1 - betas))
    log_alpha = lambda t: np.interp(t, tk, la)  # noqa: E731
    lam = lambda t: log_alpha(t) - 0.5 * np.log(1 - np.exp(2 * log_alpha(t)))  # noqa: E731
    inv_lam = lambda l: np.interp(-0.5 * np.logaddexp(0, -2 * l), la[::-1], tk[::-1])  # noqa: E731
    return log_alpha, lam, inv_lam


def reference_dpm_solver(eps_fn, z, data_pred):
    """Singlestep DPM-Solver-3 'fast', 50 NFE, written out as in §6.1 (data prediction) / Lu et al. 2022 Alg. 1-2
    (noise prediction); intermediate times through lambda^-1 as the official code does."""
    log_alpha, lam, inv_lam = _ref_schedule()
    a = lambda t: np.exp(log_alpha(t))  # noqa: E731
    s = lambda t: np.sqrt(1 - np.exp(2 * log_alpha(t)))  # noqa: E731
    grid = np.linspace(1.0, 1e-3, 51)

    def model(x, t):
        e = eps_fn(x, torch.full((x.shape[0],), 1000 * t, dtype=torch.float64))
        return (x - s(t) * e) / a(t) if data_pred else e

    x, i = z, 0
    for order in [3] * 16 + [2]:
        t0, t = grid[i], grid[i + order]
        h = lam(t) - lam(t0)
        r1 = (lam(grid[i + 1]) - lam(t0)) / h
        t1 = inv_lam(lam(t0) + r1 * h)
        m0 = model(x, t0)
        if data_pred:
            phi1 = math.expm1(-h)
            u1 = s(t1) / s(t0) * x - a(t1) * math.expm1(-r1 * h) * m0
            m1 = model(u1, t1)
            if order == 2:
                x = s(t) / s(t0) * x - a(t) * phi1 * m0 - 1 / (2 * r1) * a(t) * phi1 * (m1 - m0)
            else:
                r2 = (lam(grid[i + 2]) - lam(t0)) / h
                t2 = inv_lam(lam(t0) + r2 * h)
                phi22 = math.expm1(-r2 * h) / (r2 * h) + 1
                u2 = (s(t2) / s(t0) * x - a(t2) * math.expm1(-r2 * h) * m0
                      + r2 / r1 * a(t2) * phi22 * (m1 - m0))
                m2 = model(u2, t2)
                x = s(t) / s(t0) * x - a(t) * phi1 * m0 + 1 / r2 * a(t) * (phi1 / h + 1) * (m2 - m0)
        else:
            phi1 = math.expm1(h)
            u1 = a(t1) / a(t0) * x - s(t1) * math.expm1(r1 * h) * m0
            m1 = model(u1, t1)
            if order == 2:
                x = a(t) / a(t0) * x - s(t) * phi1 * m0 - s(t) / (2 * r1) * phi1 * (m1 - m0)
            else:
                r2 = (lam(grid[i + 2]) - lam(t0)) / h
                t2 = inv_lam(lam(t0) + r2 * h)
                u2 = (a(t2) / a(t0) * x - s(t2) * math.expm1(r2 * h) * m0
                      - r2 / r1 * s(t2) * (math.expm1(r2 * h) / (r2 * h) - 1) * (m1 - m0))
                m2 = model(u2, t2)
                x = a(t) / a(t0) * x - s(t) * phi1 * m0 - s(t) / r2 * (phi1 / h - 1) * (m2 - m0)
        i += order
    return x


def wiggly_eps(x, t, y=None):
    """A nonlinear, time-dependent stand-in for a network."""
    return torch.sin(3 * x) * bcast(t / 1000, x) + 0.2 * x


def test_dpm_solver_matches_reference():
    z = noise(4, 3, 4, 4)
    out = sde.sample(wiggly_eps, z, "dpm_solver", 50)
    torch.testing.assert_close(out, reference_dpm_solver(wiggly_eps, z, data_pred=True), rtol=0, atol=1e-11)
    # With ug_theta=0 the upsample sampler is the plain noise-prediction DPM-Solver.
    out = sde.sample(wiggly_eps, z, "dpm_solver_upsample_g", 50, ug_theta=0.0)
    torch.testing.assert_close(out, reference_dpm_solver(wiggly_eps, z, data_pred=False), rtol=0, atol=1e-11)


@pytest.mark.skipif(not os.environ.get("DIM_OFFICIAL_DPM_SOLVER"),
                    reason="set DIM_OFFICIAL_DPM_SOLVER to the official dpm_solver_pp.py to compare with it")
def test_dpm_solver_matches_official_code():
    spec = importlib.util.spec_from_file_location("official_dpm", os.environ["DIM_OFFICIAL_DPM_SOLVER"])
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    betas = S.betas[1:].float()  # as eval_ldm_discrete.py: float32 betas, float32 sampling
    z = noise(4, 3, 4, 4).float()
    model_fn = lambda x, t: wiggly_eps(x, 1000 * t)  # noqa: E731  (the official eval's net(x, 1000 t))
    ns = official.NoiseScheduleVP("discrete", betas=betas)
    expected = official.DPM_Solver(model_fn, ns, predict_x0=True).sample(z, steps=50, eps=1e-3, T=1.0)
    torch.testing.assert_close(sde.sample(wiggly_eps, z, "dpm_solver", 50), expected, rtol=0, atol=2e-5)


#################################################################################
#                         Analytic Gaussian case                                #
#################################################################################

Z_BIG = noise(64, 1024, seed=1)  # 65536 elements: standard errors 0.002 (mean) and 0.0014 (std)


def test_dpm_solver_analytic_gaussian():
    x = sde.sample(gaussian_eps, Z_BIG, "dpm_solver", 50)
    assert x.dtype == torch.float64
    # Measured: mean 0.2899 (-0.010, from starting at N(0, I) rather than the true t=1 marginal: the exact flow
    # from the same z gives 0.2901) and std 0.5086 (+1.7%; +1.5% against the exact flow: 50-step error).
    assert abs(x.mean().item() - MU) < 0.015
    assert abs(x.std().item() / SD - 1) < 0.03
    ref = exact_flow(Z_BIG, 1e-3)
    assert abs(x.std().item() / ref.std().item() - 1) < 0.02
    assert (x - ref).abs().max().item() < 0.05  # measured 0.034
    # Third-order convergence: at 500 steps the solver sits on the exact flow (measured max error 1.6e-4).
    x = sde.sample(gaussian_eps, Z_BIG[:8], "dpm_solver", 500)
    assert (x - exact_flow(Z_BIG[:8], 1e-3)).abs().max().item() < 5e-4


def test_ddim_analytic_gaussian():
    ref = exact_flow(Z_BIG, 0.0)  # DDIM ends at n = 0 (abar = 1)
    x = sde.sample(gaussian_eps, Z_BIG, "ddim", 50)
    # Measured at 50 steps: mean 0.2908, std 0.4695 (-6.2% against the exact flow: first-order discretisation).
    assert abs(x.mean().item() - MU) < 0.015
    assert abs(x.std().item() / SD - 1) < 0.08
    x = sde.sample(gaussian_eps, Z_BIG, "ddim", 1000)
    assert abs(x.std().item() / ref.std().item() - 1) < 0.006  # measured -0.44%
    assert (x - ref).abs().max().item() < 0.02  # measured 0.010


def test_euler_maruyama_analytic_gaussian():
    g = torch.Generator().manual_seed(1)
    x = sde.sample(gaussian_eps, Z_BIG, "euler_maruyama", 1000, generator=g)
    # Measured: mean 0.3011, std 0.4959 (-0.8%); at 50 steps 0.2966 / 0.4510 (-9.8%: the ancestral variance is
    # the posterior lower bound, which under-disperses with large strides).
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() / SD - 1) < 0.03
    x = sde.sample(gaussian_eps, Z_BIG, "euler_maruyama", 50, generator=g)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() / SD - 1) < 0.15


#################################################################################
#                   DDIM and ancestral sampling against diffusers               #
#################################################################################

def _diffusers_loop(scheduler, z, steps, **step_kwargs):
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps + 1, sde.discrete_steps(steps)[:-1])  # diffusers counts from 0
    x = z
    for t in scheduler.timesteps:
        eps = gaussian_eps(x, torch.full((x.shape[0],), t.item() + 1.0, dtype=torch.float64))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def test_ddim_matches_diffusers():
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
              timestep_spacing="trailing")
    z = noise(16, 64, seed=2)
    expected = _diffusers_loop(DDIMScheduler(set_alpha_to_one=True, **kw), z, 50)
    # diffusers' float32 alphas_cumprod limit the agreement
    torch.testing.assert_close(sde.sample(gaussian_eps, z, "ddim", 50), expected, rtol=0, atol=2e-5)


def test_euler_maruyama_matches_diffusers_ddpm():
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
              timestep_spacing="trailing", variance_type="fixed_small")
    z = noise(16, 64, seed=2)
    expected = _diffusers_loop(DDPMScheduler(**kw), z, 50, generator=torch.Generator().manual_seed(5))
    out = sde.sample(gaussian_eps, z, "euler_maruyama", 50, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


def test_diffusers_sampler_with_ddim_and_euler_schedulers_is_the_official_ddim():
    """DDIM (eta = 0) and Euler steps are the same update in x / alpha; with trailing spacing both visit our steps.
    Euler with trailing spacing starts from sigma_max z, not sqrt(sigma_max^2 + 1) z (diffusers' init_noise_sigma),
    that is from the official x_N = z scaled by sqrt(1 - abar_N)."""
    z = noise(16, 64, seed=2)
    start = {DDIMScheduler: 1.0, EulerDiscreteScheduler: math.sqrt(1 - S.alphas_cumprod[-1].item())}
    for scheduler in (DDIMScheduler(**OFFICIAL_BETAS, timestep_spacing="trailing", set_alpha_to_one=True,
                                    clip_sample=False),
                      EulerDiscreteScheduler(**OFFICIAL_BETAS, timestep_spacing="trailing")):
        rec = Recorder(gaussian_eps)
        out = sde.sample(rec, z, "diffusers", 50, scheduler=scheduler)
        assert [c["t"][0].item() for c in rec.calls] == sde.discrete_steps(50)[:-1].tolist()   # n = t + 1
        official = sde.sample(gaussian_eps, z * start[type(scheduler)], "ddim", 50)
        torch.testing.assert_close(out, official, rtol=0, atol=5e-5)


def test_per_sample_generators_make_noise_independent_of_the_batch():
    z = noise(4, 64, seed=3)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    whole = sde.sample(gaussian_eps, z, "euler_maruyama", 20, generator=gens([1, 2, 3, 4]))
    half = sde.sample(gaussian_eps, z[2:], "euler_maruyama", 20, generator=gens([3, 4]))
    torch.testing.assert_close(half, whole[2:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2 generators for a batch of 4"):
        sde.sample(gaussian_eps, z, "euler_maruyama", 20, generator=gens([1, 2]))


#################################################################################
#                            Upsample guidance                                  #
#################################################################################

def _expected_tau(t, m):
    """Spec of §6.3 step 3, by brute force: nearest-SNR step to m^2 SNR_floor(1000 t), tau = n / 999, <= t."""
    snr = S.snr.numpy()
    n = int(np.argmin(np.abs(snr[:1000] - m * m * snr[math.floor(1000 * t)])))
    return min(n / 999, t)


@pytest.mark.parametrize("m, tau_first, tau_last", [(2, 0.876, 0.510), (3, 0.791, 0.386)])
def test_upsample_guidance_low_res_call(m, tau_first, tau_last):
    rec = Recorder(lambda x, t, y: gaussian_eps(x, t))
    z = noise(2, 4, 8 * m, 8 * m)
    sde.sample(rec, z, "dpm_solver_upsample_g", 50, multi_times=m, ug_theta=1, ug_eta=0.3, ug_T=1)
    hi = [c for c in rec.calls if c["x"].shape[-1] == 8 * m]
    lo = [c for c in rec.calls if c["x"].shape[-1] == 8]
    assert len(hi) == 50 and len(lo) == 16 and len(rec.calls) == 66
    grid, _ = sde.dpm_solver_grid(50)
    assert grid[15] >= 0.7 > grid[16]  # guided while t >= (1 - eta) T: the first 16 evaluations
    k = -1
    for call in rec.calls:
        if call["x"].shape[-1] == 8 * m:
            k += 1
            hi_x = call["x"]
            assert torch.equal(call["t"], torch.full((2,), 1000 * grid[k].item(), dtype=torch.float64))
            continue
        t = grid[k].item()  # a low-resolution call follows the high-resolution call at grid[k]
        assert k < 16 and call["x"].shape == (2, 4, 8, 8)
        assert call["t"].tolist() == pytest.approx([1000 * _expected_tau(t, m)] * 2, rel=1e-12)
        abar = S.alphas_cumprod[math.floor(1000 * t)].item()
        P = abar + (1 - abar) / m**2
        torch.testing.assert_close(call["x"], F.avg_pool2d(hi_x, m) / math.sqrt(P))
    assert lo[0]["t"][0].item() / 1000 == pytest.approx(tau_first, abs=5e-4)  # documented examples, §6.3
    assert lo[-1]["t"][0].item() / 1000 == pytest.approx(tau_last, abs=5e-4)


def test_upsample_guidance_scale_consistent_oracle():
    """Data constant on 2x2 patches at 16x16 is i.i.d. data at 8x8: the oracle is exact at both scales, so the
    guidance correction eps_lo / m - AvgPool(eps_hi) vanishes up to the table's SNR matching. An oracle for i.i.d.
    data at every scale is not scale-consistent and gets a correction ~100x larger."""
    m, z = 2, noise(4, 4, 16, 16, seed=3)

    def run(eps_fn):
        rec = Recorder(eps_fn)
        guided = sde.sample(rec, z, "dpm_solver_upsample_g", 50, multi_times=m)
        ratios = [(lo["out"] / m - F.avg_pool2d(hi["out"], m)).abs().max() / hi["out"].abs().max()
                  for hi, lo in zip(rec.calls, rec.calls[1:]) if lo["x"].shape[-1] == 8]
        plain = sde.sample(eps_fn, z, "dpm_solver_upsample_g", 50, multi_times=m, ug_theta=0.0)
        return max(ratios).item(), (guided - plain).abs().max().item()

    # measured: max correction 0.02% of max |eps_hi|, final samples (std 0.52) moved by at most 4e-4
    ratio, moved = run(lambda x, t, y: gaussian_eps(x, t, block=x.shape[-1] // 8))
    assert ratio < 1e-3 and moved < 2e-3
    # measured: 3% and 0.033
    ratio, moved = run(gaussian_eps)
    assert ratio > 1e-2 and moved > 1e-2


#################################################################################
#                          Classifier-free guidance                             #
#################################################################################

def labelled_eps(x, t, y):
    return gaussian_eps(x, t) + 0.05 * bcast(y.double() - 4.5, x) * torch.cos(x)


@pytest.mark.parametrize("algorithm, options", [
    ("dpm_solver", {}), ("dpm_solver_upsample_g", {"multi_times": 2}), ("ddim", {}), ("euler_maruyama", "seed")])
def test_cfg_batched_equals_two_calls(algorithm, options):
    z, y, s = noise(3, 2, 8, 8), torch.tensor([0, 4, 9]), 0.4
    opts = lambda: {"generator": torch.Generator().manual_seed(0)} if options == "seed" else options  # noqa: E731
    rec = Recorder(labelled_eps)
    batched = sde.sample(rec, z, algorithm, 20, y=y, scale=s, null_class=10, **opts())
    assert all(c["x"].shape[0] == 6 and c["y"].tolist() == [0, 4, 9, 10, 10, 10] for c in rec.calls)

    def two_calls(x, t, _):
        cond, uncond = labelled_eps(x, t, y), labelled_eps(x, t, torch.full_like(y, 10))
        return cond + s * (cond - uncond)

    torch.testing.assert_close(batched, sde.sample(two_calls, z, algorithm, 20, **opts()), rtol=0, atol=1e-12)


def test_cfg_docstring_states_convention():
    assert "1.4" in sde.sample.__doc__ and "w = 1 + s" in sde.sample.__doc__


#################################################################################
#                          Dtypes and bad input                                 #
#################################################################################

@pytest.mark.parametrize("algorithm", sorted(sde.ALGORITHMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_working_dtype(algorithm, dtype):
    rec = Recorder(lambda x, t, y: gaussian_eps(x, t).float())  # a float32 network output
    options = dict(scheduler=DDIMScheduler(**OFFICIAL_BETAS)) if algorithm == "diffusers" else {}
    out = sde.sample(rec, noise(2, 4, 4, 4).to(dtype), algorithm, 4, **options)
    assert out.dtype == dtype and out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()
    assert all(c["t"].dtype == dtype and c["t"].shape == (c["x"].shape[0],) for c in rec.calls)


@pytest.mark.parametrize("kwargs, match", [
    (dict(algorithm="dpm_solver_pp"), "'dpm_solver_pp'"),
    (dict(sample_steps=0), "got 0"),
    (dict(sample_steps=2.5), "got 2.5"),
    (dict(scale=0.4), r"scale=0\.4 \(guidance\) needs class labels y"),
    (dict(scale=0.7, y=torch.tensor([1, 2])), r"null_class=None"),
    (dict(scale=-1.0, y=torch.tensor([1, 2]), null_class=10), r"got -1\.0"),
    (dict(algorithm="ddim", sample_steps=1001), "sample_steps=1001"),
    (dict(foo=1), r"\['foo'\]"),
    (dict(algorithm="ddim", generator=torch.Generator()), r"\['generator'\] for algorithm 'ddim'"),
    (dict(algorithm="dpm_solver_upsample_g", multi_times=3), r"multi_times=3, got \(2, 4, 8, 8\)"),
    (dict(algorithm="dpm_solver_upsample_g", multi_times=0), "got 0"),
    (dict(algorithm="diffusers"), "needs the option scheduler"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sde.sample(gaussian_eps, noise(2, 4, 8, 8), **kwargs)
