"""The official samplers as a diffusers scheduler, and how the official schedule maps onto diffusers'.

The mapping (docs/getting-images.md, "diffusers' schedulers"):
- betas: diffusers' `scaled_linear` from 0.00085 to 0.012 over 1000 steps (`DIFFUSERS_SCHEDULE`), the schedule of
  `sde.SCHEDULE`; diffusers' alphas_cumprod[t] is our abar_{t+1}.
- timesteps: diffusers' t in {0..999} is our step n = t + 1 in {1..1000} (step 0 is the clean data): the network is
  fed n = t + 1 (`sde._diffusers_steps`).
- guidance: our eps_c + s (eps_c - eps_u) is diffusers' eps_u + w (eps_c - eps_u) with w = `guidance_scale` = 1 + s.

Any diffusers scheduler made with `from_config(pipe.scheduler.config)` gets these betas.
"""
from diffusers import ConfigMixin, SchedulerMixin  # diffusers' loader finds the load method through these names
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from libs.sampling import UPSAMPLE_KEYS

__all__ = ['DiMScheduler', 'DIFFUSERS_SCHEDULE', 'BASE_ALGORITHMS', 'guidance_scale_of', 'scale_of']

DIFFUSERS_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule='scaled_linear', prediction_type='epsilon')
# The samplers at the model's own resolution; above it, upsample guidance ('dpm_solver_upsample_g') takes over.
BASE_ALGORITHMS = ('dpm_solver', 'ddim', 'euler_maruyama')


def guidance_scale_of(scale):
    """diffusers' guidance_scale w of our classifier-free guidance scale s: w = 1 + s."""
    return 1.0 + float(scale)


def scale_of(guidance_scale):
    """Our guidance scale s of diffusers' guidance_scale w: s = w - 1 (w = 1: no guidance)."""
    return float(guidance_scale) - 1.0


class DiMScheduler(SchedulerMixin, ConfigMixin):
    """The official samplers of sde.py (`algorithm`: 'dpm_solver', 'ddim' or 'euler_maruyama'), and what sampling
    above the model's resolution uses, as the upsample configs (configs/imagenet512_H_DiM_upsample*_test.py):
    upsample guidance with `ug_theta`, `ug_eta`, `ug_T`, and the network's skip-tune `upsample_skip_tune` =
    (top, bottom) of config.nnet.skip_tune_param (None: off).

    It has no `step()`: DiMPipeline hands it to the one generate loop (libs.sampling), which runs `sde.sample`.
    The schedule keys are diffusers' names for sde.SCHEDULE, so that `DPMSolverMultistepScheduler.from_config(
    pipe.scheduler.config)` and the like get the right betas; other values are refused.
    """
    config_name = 'scheduler_config.json'
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, algorithm='dpm_solver', ug_theta=1.0, ug_eta=0.3, ug_T=1.0, upsample_skip_tune=(0.82, 1.0),
                 num_train_timesteps=1000,
                 beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', prediction_type='epsilon'):
        if algorithm not in BASE_ALGORITHMS:
            raise ValueError(f"DiMScheduler algorithm={algorithm!r}; expected one of {', '.join(BASE_ALGORITHMS)}")
        schedule = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                        beta_schedule=beta_schedule, prediction_type=prediction_type)
        wrong = {k: v for k, v in schedule.items() if v != DIFFUSERS_SCHEDULE[k]}
        if wrong:
            raise ValueError(f"DiMScheduler runs the schedule of sde.py only ({DIFFUSERS_SCHEDULE}); got {wrong}")
        if upsample_skip_tune is not None and len(upsample_skip_tune) != 2:
            raise ValueError(f"upsample_skip_tune={upsample_skip_tune!r}: expected (top, bottom) or None")
        # Another scheduler's from_config(this config) drops the keys listed as defaults here and takes its own
        # defaults instead (diffusers' `_use_default_values`): the schedule keys must always be passed on.
        defaults = [k for k in self.config.get('_use_default_values', []) if k not in DIFFUSERS_SCHEDULE]
        self.register_to_config(_use_default_values=defaults)

    def upsample_options(self, multi_times):
        """sde.sample's options of upsample guidance at `multi_times` x the model's resolution, as SamplingSpec's
        `upsample` field."""
        return (('multi_times', int(multi_times)), *((k, float(self.config[k])) for k in UPSAMPLE_KEYS))

    def skip_tune_for_upsampling(self):
        """The DiM `skip_tune` of upsampled sampling: (top, bottom, 'official'), or None."""
        top_bottom = self.config.upsample_skip_tune
        return None if top_bottom is None else (float(top_bottom[0]), float(top_bottom[1]), 'official')
