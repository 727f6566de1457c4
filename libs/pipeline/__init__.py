"""DiM in diffusers: the backbone as a diffusers model, the official samplers as a scheduler, `DiMPipeline`, and
the conversion of released checkpoints into pipeline folders (docs/getting-images.md).

    import libs.pipeline                      # diffusers imports no module a folder names: import this first
    pipe = DiffusionPipeline.from_pretrained('dim-digits')          # or DiMPipeline.from_pretrained(...)
"""
import diffusers

from .pipeline import DiMPipeline
from .scheduler import DiMScheduler
from .transformer import DiMTransformer2DModel

__all__ = ['DiMPipeline', 'DiMScheduler', 'DiMTransformer2DModel']

# DiffusionPipeline.from_pretrained looks the `_class_name` of model_index.json up as an attribute of the diffusers
# module (diffusers.pipelines.pipeline_loading_utils._get_pipeline_class); the components are found in sys.modules
# under the module names model_index.json records (libs.pipeline.transformer, libs.pipeline.scheduler).
diffusers.DiMPipeline = DiMPipeline
