"""The official schedule in diffusers' terms (libs/pipeline/scheduler.py): betas, the timestep offset and the
guidance convention, checked numerically against sde.py, and DiMScheduler's configuration."""
import json
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, UniPCMultistepScheduler)

import sde
from libs.pipeline.scheduler import DIFFUSERS_SCHEDULE, DiMScheduler, guidance_scale_of, scale_of

SCHEDULERS = (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
              EulerAncestralDiscreteScheduler, UniPCMultistepScheduler)
ABAR = sde.SCHEDULE.alphas_cumprod


@pytest.mark.parametrize('cls', SCHEDULERS)
def test_schedulers_from_the_pipeline_config_have_the_official_betas(cls):
    scheduler = cls.from_config(DiMScheduler().config)
    # diffusers' step t in {0..999} is our n = t + 1 (our n = 0 is the clean data, abar_0 = 1)
    torch.testing.assert_close(scheduler.betas.double(), sde.SCHEDULE.betas[1:], rtol=1e-6, atol=0)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ABAR[1:], rtol=1e-5, atol=0)


@pytest.mark.parametrize('cls', SCHEDULERS)
def test_the_network_input_through_a_diffusers_scheduler_is_the_official_x_n_at_n_equal_t_plus_1(cls):
    """x0 noised by the scheduler at its timestep t and scaled for the model is our x_n = sqrt(abar_n) x0 +
    sqrt(1 - abar_n) eps at n = t + 1: the network sees the noise level it was trained with at the step it is told.
    (Trailing spacing keeps t an integer: between integers the Euler family interpolates sigma linearly, our
    continuous view log alpha.)"""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    config = dict(DiMScheduler().config, timestep_spacing='trailing')
    steps = cls.from_config(config)
    steps.set_timesteps(20)
    assert torch.equal(steps.timesteps, steps.timesteps.round()) and len(steps.timesteps) == 20
    for t in steps.timesteps:
        scheduler = cls.from_config(config)      # a fresh one: scale_model_input keeps a step index
        scheduler.set_timesteps(20)
        noisy = scheduler.add_noise(x0, eps, t.reshape(1))
        model_input = scheduler.scale_model_input(noisy, t)
        n = int(t) + 1
        official = math.sqrt(ABAR[n]) * x0 + math.sqrt(1 - ABAR[n]) * eps
        torch.testing.assert_close(model_input, official, rtol=0, atol=2e-5)


def test_guidance_conventions():
    """Ours: eps_c + s (eps_c - eps_u); diffusers': eps_u + w (eps_c - eps_u); w = 1 + s."""
    eps_c, eps_u = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    for s in (0.0, 0.4, 3.0):
        w = guidance_scale_of(s)
        torch.testing.assert_close(eps_u + w * (eps_c - eps_u), eps_c + s * (eps_c - eps_u))
        assert scale_of(w) == pytest.approx(s)


def test_dim_scheduler_takes_the_official_schedule_and_samplers_only(tmp_path):
    scheduler = DiMScheduler(algorithm='ddim', ug_theta=0.5)
    scheduler.save_pretrained(tmp_path)
    loaded = DiMScheduler.from_pretrained(tmp_path)
    public = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith('_')}))
    assert public(loaded.config) == public(scheduler.config)
    assert {k: loaded.config[k] for k in DIFFUSERS_SCHEDULE} == DIFFUSERS_SCHEDULE
    assert loaded.upsample_options(3) == (('multi_times', 3), ('ug_theta', 0.5), ('ug_eta', 0.3), ('ug_T', 1.0))
    assert loaded.skip_tune_for_upsampling() == (0.82, 1.0, 'official')
    assert 'DPMSolverMultistepScheduler' in [c.__name__ for c in loaded.compatibles]
    with pytest.raises(ValueError, match="DiMScheduler runs the schedule of sde.py only .* got {'beta_end': 0.02}"):
        DiMScheduler(beta_end=0.02)
    with pytest.raises(ValueError, match="algorithm='dpm_solver_upsample_g'; expected one of dpm_solver, ddim"):
        DiMScheduler(algorithm='dpm_solver_upsample_g')
