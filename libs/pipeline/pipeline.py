"""DiMPipeline: class labels (ids or names) -> images, as a diffusers `DiffusionPipeline`.

    pipe = DiMPipeline.from_pretrained('dim-imagenet256')            # a folder of scripts/convert_to_diffusers.py
    images = pipe(['golden retriever', 'otter', 207], generator=torch.Generator().manual_seed(0)).images

With its own scheduler (`DiMScheduler`) the pipeline runs the official sampler through the one generate loop of
libs.sampling: the same images as sample.py and eval_ldm_discrete.py for the same seed, labels, steps and guidance
(image i's noise comes from (seed, i); the seed is the generator's `initial_seed()`). With a diffusers scheduler
(`pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`) the same loop runs sde's
'diffusers' sampler (the schedule mapping: libs/pipeline/scheduler.py).
"""
import contextlib
import os

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from libs.data.autoencoder import FrozenAutoencoder
from libs.data.class_names import resolve_classes
from libs.evaluation.sample_files import png_array
from libs.evaluation.sample_scorer import to_uint8
from libs.model.dim import interpolate_pos_table
from libs.pipeline.scheduler import DiMScheduler, scale_of
from libs.sampling import SamplingSpec, sample_batches

__all__ = ['DiMPipeline']

OUTPUT_TYPES = ('pil', 'np', 'pt')


def seed_of(generator):
    """The seed of the images: a torch.Generator's initial_seed(), an int as is, None a fresh one from torch's
    global generator."""
    if generator is None:
        return int(torch.randint(0, 2 ** 62, ()).item())
    if isinstance(generator, torch.Generator):
        return generator.initial_seed()
    if isinstance(generator, int) and not isinstance(generator, bool):
        return generator
    raise TypeError(f"generator must be one torch.Generator or an int seed (image i's noise comes from (seed, i)), "
                    f"got {type(generator).__name__}")


@contextlib.contextmanager
def upsampling(transformer, grid, skip_tune):
    """The transformer as the upsample configs build it from the same weights, for the duration of the block: its
    positional table resized to a grid x grid token grid (as loading does, docs/architecture.md §11) and its
    long skips rescaled by `skip_tune` ((top, bottom, schedule) or None; §6)."""
    if skip_tune is not None and len(transformer.skip_consumers) < 2:
        raise ValueError('skip-tune needs at least two long-skip layers')
    table, saved = transformer.additional_embed, (transformer.additional_embed.data, transformer.skip_tune)
    if table.shape[1] != 2 + grid * grid:
        table.data = interpolate_pos_table(saved[0].float(), grid, grid).to(saved[0].dtype)
    transformer.skip_tune = skip_tune
    try:
        yield
    finally:
        table.data, transformer.skip_tune = saved


class DiMPipeline(DiffusionPipeline):
    """transformer (DiMTransformer2DModel), scheduler (DiMScheduler or a diffusers scheduler), vae (diffusers'
    AutoencoderKL, or None for a pixel-space model); id2label {id: name} or None; conditional (False: an
    unconditional model); guidance_scale and num_inference_steps: the defaults of `__call__` (those of the config
    the pipeline was made from)."""
    model_cpu_offload_seq = 'transformer->vae'
    _optional_components = ['vae']

    def __init__(self, transformer, scheduler, vae=None, id2label=None, conditional=True, guidance_scale=1.0,
                 num_inference_steps=50):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        id2label = None if id2label is None else {str(k): v for k, v in id2label.items()}
        self.register_to_config(id2label=id2label, conditional=bool(conditional),
                                guidance_scale=float(guidance_scale), num_inference_steps=int(num_inference_steps))

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        """diffusers' `from_pretrained` of a local pipeline folder, never a download: FileNotFoundError naming the
        folder when it is not one."""
        if not os.path.isfile(os.path.join(folder, 'model_index.json')):
            raise FileNotFoundError(f"pipeline folder not found: {folder} has no model_index.json (make one with "
                                    "scripts/convert_to_diffusers.py; docs/getting-images.md)")
        return super().from_pretrained(folder, local_files_only=True, **kwargs)

    @property
    def id2label(self):
        """{class id: name}, or None when the classes have no names."""
        names = self.config.id2label
        return None if names is None else {int(k): v for k, v in names.items()}

    @property
    def labels(self):
        """Class names in id order, or None."""
        names = self.id2label
        return None if names is None else [names[k] for k in range(len(names))]

    def get_label_ids(self, names):
        """Class ids of `names` (names, case-insensitive, or ids); ValueError with the closest names otherwise."""
        names = [names] if isinstance(names, (str, int)) else list(names)
        return resolve_classes(names, self.labels, self.transformer.num_classes)

    def latent_factor(self):
        """Pixels per latent: the VAE's downsampling factor, 1 without a VAE."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _spec(self, height, width, steps, scale, seed, batch_size):
        """(SamplingSpec, multi_times) of a request; ValueError for a size the model cannot make."""
        f, base = self.latent_factor(), self.transformer.config.sample_size
        height = height or self.transformer.config.sample_size * f
        width = width or height
        m = height // (base * f)
        if height != width or m < 1 or height != m * base * f:
            raise ValueError(f"height and width must be equal multiples of the model's resolution {base * f} "
                             f"({base * f}, {2 * base * f}, ...; above it upsample guidance), got {height}x{width}")
        if isinstance(self.scheduler, DiMScheduler):
            algorithm = 'dpm_solver_upsample_g' if m > 1 else self.scheduler.config.algorithm
            scheduler, upsample = None, self.scheduler.upsample_options(m) if m > 1 else ()
        elif m > 1:
            raise ValueError("sizes above the model's resolution need the official sampler (DiMScheduler): upsample "
                             "guidance is not a diffusers scheduler")
        else:
            algorithm, scheduler, upsample = 'diffusers', self.scheduler, ()
        K = self.transformer.num_classes
        z_shape = (self.transformer.in_channels, height // f, width // f)
        spec = SamplingSpec(algorithm=algorithm, sample_steps=steps, scale=scale, num_classes=K,
                            conditional=self.config.conditional, seed=seed, z_shape=z_shape,
                            mini_batch_size=batch_size, upsample=upsample, scheduler=scheduler)
        return spec, m

    def _labels(self, class_labels, num_images):
        if not self.config.conditional:
            if class_labels is not None or not num_images:
                raise ValueError("this model is unconditional: give num_images, not class_labels")
            return None, num_images
        if class_labels is None:
            raise ValueError("give class_labels: class ids or names (pipe.labels lists the names)")
        ids = self.get_label_ids(class_labels)
        return torch.tensor(ids, dtype=torch.long), len(ids)

    @torch.no_grad()
    def __call__(self, class_labels=None, guidance_scale=None, num_inference_steps=None, generator=None,
                 height=None, width=None, output_type='pil', return_dict=True, num_images=None, batch_size=None):
        """Images of `class_labels` (ids or names; for an unconditional model `num_images` images instead).

        guidance_scale: diffusers' w = 1 + s (1: no guidance); num_inference_steps: the sampler's steps (network
        evaluations for the DPM-Solver); generator: a torch.Generator or an int, whose seed picks the noise;
        height, width: pixels, the model's resolution by default, an integer multiple of it for upsample guidance;
        output_type: 'pil' (uint8 as sample.py's PNGs), 'np' ((B, H, W, C) floats in [0, 1]) or 'pt'
        ((B, C, H, W) floats in [0, 1]); batch_size: images per network batch (all at once by default).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        labels, n = self._labels(class_labels, num_images)
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if guidance_scale < 1 or (not self.config.conditional and guidance_scale != 1):
            raise ValueError(f"guidance_scale={guidance_scale}: must be >= 1 (1: no guidance), and 1 for an "
                             "unconditional model")
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        spec, m = self._spec(height, width, steps, scale_of(guidance_scale), seed_of(generator), batch_size or n)
        upsample = contextlib.nullcontext() if m == 1 else upsampling(
            self.transformer, spec.z_shape[-1] // self.transformer.patch_size,
            self.scheduler.skip_tune_for_upsampling())
        with upsample:
            images = self._sample(spec, labels, n)
        self.maybe_free_model_hooks()
        images = as_output(images, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _sample(self, spec, labels, n):
        """Images 0..n-1 of `spec` in [0, 1], (n, C, H, W) on the CPU, through libs.sampling's generate loop; the
        network under autocast to its parameters' dtype when they are not fp32."""
        autoencoder = None if self.vae is None else FrozenAutoencoder(self.vae, self.vae.config.scaling_factor)
        dtype = self.transformer.dtype
        autocast = (contextlib.nullcontext if dtype == torch.float32 else
                    lambda: torch.autocast(self.transformer.device.type, dtype=dtype))
        progress = dict(desc='DiM', **getattr(self, '_progress_bar_config', {}))
        return torch.cat([x for _, x in sample_batches(self.transformer, spec, spec.index_batches(n), labels,
                                                       autoencoder=autoencoder, autocast=autocast,
                                                       progress=progress)])


def as_output(images, output_type):
    """(B, C, H, W) floats in [0, 1] as `output_type`: 'pil' (uint8 as sample.py's PNGs), 'np' ((B, H, W, C)
    floats) or 'pt' (as they are)."""
    if output_type == 'pil':
        return [Image.fromarray(png_array(x)) for x in to_uint8(images)]
    return images.permute(0, 2, 3, 1).numpy() if output_type == 'np' else images
