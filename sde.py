"""Noise schedule, training loss and samplers of DiM (discrete-time latent diffusion).

Everything here works on any noise-prediction network ``eps_fn(x, timesteps, y) -> eps`` where ``x`` is
(B, C, H, W) (any (B, ...) shape for the non-upsample samplers), ``timesteps`` a (B,) float tensor on the
0..N scale (N = 1000) and ``y`` a (B,) long tensor of class labels or None.

Notation: n in {0..N} is a discrete step, t = n / N the continuous time, abar_n = prod_{i<=n} (1 - beta_i)
with abar_0 = 1, alpha_t = sqrt(abar), sigma_t = sqrt(1 - abar), lambda_t = log(alpha_t / sigma_t).
"""
import inspect
import math

import torch
import torch.nn.functional as F


#################################################################################
#                                 Noise Schedule                                #
#################################################################################

class DiscreteSchedule:
    """The Stable-Diffusion "scaled linear" schedule, in float64.

    Discrete tables of shape (N + 1,), indexed by the step n = 0..N (index 0 is the clean data):
    ``betas`` (betas[0] = 0), ``alphas_cumprod`` (abar_0 = 1) and ``snr`` = abar / (1 - abar) (snr[0] = inf).

    Continuous view (as the official ``NoiseScheduleVP('discrete')``): log alpha is piecewise linear in t between
    the knots t_k = k / N, with log alpha(t_k) = log(abar_k) / 2, and extends linearly beyond [0, 1]. The official
    knots start at k = 1; both agree on [1/N, 1], which is where every sampler here lives.
    """

    def __init__(self, N=1000, beta_start=0.00085, beta_end=0.012):
        self.N = N
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, N, dtype=torch.float64) ** 2
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self._knots_t = torch.arange(N + 1, dtype=torch.float64) / N
        self._knots_log_alpha = 0.5 * torch.log(self.alphas_cumprod)

    def marginal_log_alpha(self, t):
        """log alpha_t for a tensor (or number) t of any shape; float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return _interp(t, self._knots_t.to(t.device), self._knots_log_alpha.to(t.device))

    def marginal_alpha(self, t):
        return self.marginal_log_alpha(t).exp()

    def marginal_sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_alpha(t)))

    def marginal_lambda(self, t):
        log_alpha = self.marginal_log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam):
        """The t with marginal_lambda(t) = lam (log alpha = -softplus(-2 lam) / 2, then invert the interpolation)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        log_alpha = -0.5 * F.softplus(-2.0 * lam)
        # log alpha decreases with t: interpolate on the negated (increasing) knots.
        return _interp(-log_alpha, -self._knots_log_alpha.to(lam.device), self._knots_t.to(lam.device))


def _interp(x, xp, fp):
    """Piecewise-linear interpolation through (xp, fp), xp increasing, extended linearly outside [xp[0], xp[-1]]."""
    k = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[k - 1], xp[k], fp[k - 1], fp[k]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


SCHEDULE = DiscreteSchedule(N=1000)


#################################################################################
#                                 Training Loss                                 #
#################################################################################

_ABAR_ON_DEVICE = {}


def _alphas_cumprod_on(device):
    """SCHEDULE.alphas_cumprod on ``device``, copied once per device (a per-step copy would be a blocking host to
    device transfer, which waits for the device to drain)."""
    key = torch.device(device)
    if key not in _ABAR_ON_DEVICE:
        _ABAR_ON_DEVICE[key] = SCHEDULE.alphas_cumprod.to(key)
    return _ABAR_ON_DEVICE[key]


def diffusion_loss(eps_fn, x0, y=None, generator=None):
    """Per-sample epsilon-prediction MSE, shape (B,), for clean latents x0 of shape (B, ...).

    n ~ U{1..N} and eps ~ N(0, I) are drawn with ``generator`` when given (so a resumed run can replay them) and
    x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps is returned to x0's dtype. The network gets n as a float32 tensor
    (exact integers, also under bf16 autocast, unlike the official bf16 rounding). The MSE is averaged over the
    non-batch dimensions in fp32 (float64 for float64 inputs). With a generator on x0's device nothing is copied
    between host and device and nothing is read back (no synchronisation).
    """
    B, N = x0.shape[0], SCHEDULE.N
    device = generator.device if generator is not None else x0.device
    work = torch.promote_types(x0.dtype, torch.float32)
    n = torch.randint(1, N + 1, (B,), generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=work)
    if device != x0.device:                     # a generator on another device: draw there, then move
        n, eps = n.to(x0.device), eps.to(x0.device)
    abar = _alphas_cumprod_on(x0.device)[n].to(work).view(B, *[1] * (x0.dim() - 1))
    x_n = (abar.sqrt() * x0.to(work) + (1.0 - abar).sqrt() * eps).to(x0.dtype)
    pred = eps_fn(x_n, n.to(torch.float32), y)
    return (pred.to(work) - eps).pow(2).flatten(1).mean(dim=1)


#################################################################################
#                            Classifier-Free Guidance                           #
#################################################################################

def _guided_eps(eps_fn, y, guidance, null_class, dtype):
    """eps(x, time) with time a number on the 0..N scale; one eps_fn call per evaluation, output in ``dtype``."""
    time_dtype = torch.promote_types(dtype, torch.float32)

    def eps(x, time):
        ts = torch.full((x.shape[0],), float(time), dtype=time_dtype, device=x.device)
        if guidance == 0:
            return eps_fn(x, ts, y).to(dtype)
        y_null = torch.full_like(y, null_class)
        cond, uncond = eps_fn(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([y, y_null])).to(dtype).chunk(2)
        return cond + guidance * (cond - uncond)

    return eps


#################################################################################
#                  DPM-Solver, singlestep order 3 (official "fast")              #
#################################################################################

def dpm_solver_grid(steps=50, t_start=1.0, t_end=1e-3):
    """The time-uniform grid (steps + 1,) float64 from t_start to t_end, and the order of each solver step.

    Orders: [3] * (steps // 3 - 1) + [2, 1] if steps % 3 == 0, [3] * (steps // 3) + [1] if steps % 3 == 1, else
    [3] * (steps // 3) + [2]; a step of order k goes from grid point i to i + k through the points in between.
    They sum to ``steps``, so the network is evaluated exactly once at each of t[0], ..., t[steps - 1] (in this
    order) and never at t[steps]. For 50 steps: [3] * 16 + [2].
    """
    t = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    K, rest = steps // 3, steps % 3
    orders = [3] * (K - 1) + [2, 1] if rest == 0 else [3] * K + [rest]
    return t, orders


def _dpm_solver(model, z, steps, data_pred):
    """Singlestep DPM-Solver-3 on ``dpm_solver_grid(steps)``; model(x, t) -> eps, t a float. No final denoise.

    data_pred=True is DPM-Solver++ (the update uses x0_hat = (x - sigma eps) / alpha), False is the original
    noise-prediction DPM-Solver. With the 'dpm_solver' variant of the update rules (2nd order: midpoint form;
    3rd order: the phi_2 form for both the second intermediate point and the end point), as in the official code.
    The intermediate points of a step are the grid points in between (the official code recomputes them through
    lambda^-1, which gives the same times up to rounding).

    diffusers' DPMSolverSinglestepScheduler cannot reproduce this: it rounds the grid to integer timesteps (and
    calls the net there), and one ``solver_type`` cannot give both the midpoint 2nd-order last step and the phi_2
    form that this 3rd-order step uses for its second intermediate point.
    """
    ts, orders = dpm_solver_grid(steps)
    alpha, sigma = SCHEDULE.marginal_alpha(ts).tolist(), SCHEDULE.marginal_sigma(ts).tolist()
    lam = SCHEDULE.marginal_lambda(ts).tolist()
    # DPM-Solver++ is DPM-Solver with (alpha, sigma, h, eps) replaced by (sigma, alpha, -h, x0_hat).
    p, q, sign = (sigma, alpha, -1.0) if data_pred else (alpha, sigma, 1.0)

    def f(x, k):
        e = model(x, ts[k].item())
        return (x - sigma[k] * e) / alpha[k] if data_pred else e

    def phi2(h):
        return math.expm1(h) / h - 1.0

    x, i = z, 0
    for order in orders:
        j = i + order
        h = sign * (lam[j] - lam[i])
        f0 = f(x, i)

        def first(k, hk):  # first-order move from grid point i to k over the step hk
            return (p[k] / p[i]) * x - q[k] * math.expm1(hk) * f0

        if order == 1:
            x = first(j, h)
        else:
            r1 = (lam[i + 1] - lam[i]) / (lam[j] - lam[i])
            f1 = f(first(i + 1, r1 * h), i + 1)
            if order == 2:
                x = first(j, h) - (0.5 / r1) * q[j] * math.expm1(h) * (f1 - f0)
            else:
                r2 = (lam[i + 2] - lam[i]) / (lam[j] - lam[i])
                u2 = first(i + 2, r2 * h) - (r2 / r1) * q[i + 2] * phi2(r2 * h) * (f1 - f0)
                f2 = f(u2, i + 2)
                x = first(j, h) - (1.0 / r2) * q[j] * phi2(h) * (f2 - f0)
        i = j
    return x


#################################################################################
#                               Upsample Guidance                               #
#################################################################################

def _upsample_tau(t, m):
    """Low-resolution time for high-resolution time t (a float) and upsample factor m, as the official code.

    SNR(t) is read from the discrete table at floor(N t); the step n in {0..N-1} whose SNR is nearest to
    m^2 SNR(t) (snr[0] = inf) gives tau = n / (N - 1), capped at t. The /(N - 1) on the /N grid is an official quirk,
    kept on purpose (it shifts tau by up to one step). The official table is float32, which misfiles 5 of its 1000
    entries; on the 50-step grid this changes no tau for m = 2 or 3, so the exact table is used here.
    """
    N = SCHEDULE.N
    n = (SCHEDULE.snr[math.floor(N * t)] * m * m - SCHEDULE.snr[:N]).abs().argmin().item()
    return min(n / (N - 1), t)


def _upsample_guided(eps, shape, multi_times=2, ug_theta=1.0, ug_eta=0.3, ug_T=1.0):
    """model(x, t) for the noise-prediction DPM-Solver with Upsample Guidance (arXiv 2404.01709).

    eps_hi = eps(x, N t). While t >= (1 - ug_eta) ug_T, with P = abar + (1 - abar) / m^2 from the table at floor(N t):
    eps_lo = eps(AvgPool_m(x) / sqrt(P), N tau), shape (B, C, H/m, W/m), tau from ``_upsample_tau``, and
    eps = eps_hi + ug_theta * NearestUp_m(eps_lo / m - AvgPool_m(eps_hi)). eps_fn must accept both grid sizes.
    """
    m = multi_times
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"multi_times must be a positive integer, got {m!r}")
    if len(shape) != 4 or shape[-2] % m or shape[-1] % m:
        raise ValueError(f"dpm_solver_upsample_g needs z of shape (B, C, H, W) with H and W divisible by "
                         f"multi_times={m}, got {tuple(shape)}")
    N = SCHEDULE.N

    def model(x, t):
        eps_hi = eps(x, N * t)
        if not (ug_theta > 0 and t >= (1.0 - ug_eta) * ug_T):
            return eps_hi
        abar = SCHEDULE.alphas_cumprod[math.floor(N * t)].item()
        P = abar + (1.0 - abar) / m ** 2
        eps_lo = eps(F.avg_pool2d(x, m) / math.sqrt(P), N * _upsample_tau(t, m))
        correction = eps_lo / m - F.avg_pool2d(eps_hi, m)
        return eps_hi + ug_theta * correction.repeat_interleave(m, dim=-2).repeat_interleave(m, dim=-1)

    return model


#################################################################################
#                     Discrete-Step Samplers: DDIM, Ancestral                   #
#################################################################################

def discrete_steps(steps):
    """The steps n visited by ``ddim`` and ``euler_maruyama``: round(linspace(N, 0, steps + 1)), a long tensor.

    For 50 steps: 1000, 980, ..., 20, 0 (diffusers' "trailing" spacing, shifted by one as diffusers counts from 0).
    """
    return torch.linspace(SCHEDULE.N, 0, steps + 1, dtype=torch.float64).round().long()


def _ddim(eps, z, steps):
    """Deterministic DDIM (eta = 0) from n = N down to n = 0 (abar_0 = 1, so the result is x0_hat)."""
    abar, x = SCHEDULE.alphas_cumprod, z
    ns = discrete_steps(steps).tolist()
    for n, n_prev in zip(ns[:-1], ns[1:]):
        a, a_prev = abar[n].item(), abar[n_prev].item()
        e = eps(x, n)
        x0 = (x - math.sqrt(1.0 - a) * e) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * e
    return x


def _noise_like(x, generator):
    """Standard normal noise shaped like x, on x's device: from ``generator`` (on any device), or row b from
    ``generator[b]`` when it is a list of one generator per sample (the rows then do not depend on the batch)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([_noise_like(row, g) for row, g in zip(x, generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _ancestral(eps, z, steps, generator=None):
    """Ancestral DDPM sampling over ``discrete_steps(steps)``: the posterior q(x_prev | x_n, x0_hat), variance
    (1 - abar_prev) / (1 - abar_n) * beta with beta = 1 - abar_n / abar_prev; no noise on the last step.
    generator: None, one generator, or a list of one generator per sample (``_noise_like``)."""
    abar, x = SCHEDULE.alphas_cumprod, z
    ns = discrete_steps(steps).tolist()
    for n, n_prev in zip(ns[:-1], ns[1:]):
        a, a_prev = abar[n].item(), abar[n_prev].item()
        beta = 1.0 - a / a_prev
        e = eps(x, n)
        x0 = (x - math.sqrt(1.0 - a) * e) / math.sqrt(a)
        x = (math.sqrt(a_prev) * beta / (1.0 - a)) * x0 + (math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a)) * x
        if n_prev > 0:
            x = x + math.sqrt(beta * (1.0 - a_prev) / (1.0 - a)) * _noise_like(x, generator)
    return x


def _diffusers_steps(eps, z, steps, scheduler=None, generator=None):
    """A diffusers scheduler's own loop over its timesteps t in {0..N-1}, the network called at step n = t + 1.

    The scheduler must be made with the betas of SCHEDULE (``scaled_linear`` 0.00085 -> 0.012 over N = 1000 steps,
    epsilon prediction): its alphas_cumprod[t] is our abar_{t+1}, as diffusers counts steps from 0 and we count
    the clean data as step 0. Its model input (``scale_model_input``: x / sqrt(sigma^2 + 1) for the Euler family,
    x as is for DDIM / DPM-Solver) is the variance-preserving x_n the network was trained on. ``generator``
    (None, one, or one per sample) goes to ``step`` for the stochastic schedulers.
    """
    if scheduler is None:
        raise ValueError("algorithm 'diffusers' needs the option scheduler (a diffusers scheduler object)")
    scheduler.set_timesteps(steps, device=z.device)
    takes_generator = 'generator' in inspect.signature(scheduler.step).parameters
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        e = eps(scheduler.scale_model_input(x, t), float(t) + 1)
        extra = dict(generator=generator) if takes_generator else {}
        x = scheduler.step(e, t, x, **extra).prev_sample.to(z.dtype)
    return x


#################################################################################
#                                  Entry Point                                  #
#################################################################################

ALGORITHMS = {
    "dpm_solver": (),
    "dpm_solver_upsample_g": ("multi_times", "ug_theta", "ug_eta", "ug_T"),
    "euler_maruyama": ("generator",),
    "ddim": (),
    "diffusers": ("scheduler", "generator"),
}


@torch.no_grad()
def sample(eps_fn, z, algorithm="dpm_solver", sample_steps=50, y=None, scale=0.0, null_class=None, **options):
    """Generate x0 from the initial noise z, shape (B, ...); the result has z's shape, dtype and device.

    z's dtype is the working dtype; eps_fn outputs are cast to it and the timesteps it gets are z's dtype (at
    least float32).

    The keywords are config.sample's keys (``algorithm``, ``sample_steps``, ``scale``, ``ug_*``).
    Algorithms (``sample_steps`` = number of network evaluations for the first two, number of steps for the others):
      * ``dpm_solver``: DPM-Solver++ singlestep order 3 on the time-uniform grid 1 -> 1e-3 (``dpm_solver_grid``),
        network called at N t, no final denoise. The official sampler of every ImageNet config (50 steps).
      * ``dpm_solver_upsample_g``: upsample guidance for a model sampled at multi_times x its training size, on
        the same grid with the noise-prediction DPM-Solver. Options ``multi_times`` (default 2), ``ug_theta`` (1),
        ``ug_eta`` (0.3), ``ug_T`` (1): see ``_upsample_guided``. z must be (B, C, H, W), H and W divisible by m.
      * ``euler_maruyama``: ancestral DDPM sampling N -> 0 over ``discrete_steps(steps)``; option ``generator``
        (a seeded torch.Generator) for its noise.
      * ``ddim``: deterministic DDIM over the same steps, for quick previews.
      * ``diffusers``: a diffusers scheduler (option ``scheduler``, with this schedule's betas) over its own
        ``steps`` timesteps, the network called at t + 1 (``_diffusers_steps``); option ``generator`` for the
        stochastic ones.

    Classifier-free guidance: eps = eps_c + s (eps_c - eps_u) with s = ``scale``, eps_u from labels
    ``null_class``; s = 0.4 is "1.4" in the eps_u + w (eps_c - eps_u) convention (w = 1 + s). The conditional and
    unconditional passes are one eps_fn call on the batch concatenated as [x; x] with labels [y; null_class].
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {sorted(ALGORITHMS)}")
    unknown = sorted(set(options) - set(ALGORITHMS[algorithm]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for algorithm {algorithm!r}; "
                         f"it accepts {list(ALGORITHMS[algorithm])}")
    steps = sample_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample_steps must be a positive integer, got {steps!r}")
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale!r}")
    if scale > 0 and (y is None or null_class is None):
        raise ValueError(f"scale={scale!r} (guidance) needs class labels y and null_class, got "
                         f"y={'None' if y is None else 'a tensor'} and null_class={null_class!r}")
    eps = _guided_eps(eps_fn, y, scale, null_class, z.dtype)
    N = SCHEDULE.N
    if algorithm == "dpm_solver":
        return _dpm_solver(lambda x, t: eps(x, N * t), z, steps, data_pred=True)
    if algorithm == "dpm_solver_upsample_g":
        return _dpm_solver(_upsample_guided(eps, z.shape, **options), z, steps, data_pred=False)
    if algorithm == "diffusers":
        return _diffusers_steps(eps, z, steps, **options)
    if steps > N:
        raise ValueError(f"{algorithm} takes at most N={N} steps, got sample_steps={steps}")
    if algorithm == "ddim":
        return _ddim(eps, z, steps)
    return _ancestral(eps, z, steps, **options)
