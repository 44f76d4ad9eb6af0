"""Class-conditional DDPM training and sampling on Hugging Face diffusers and Accelerate."""

from pipeline.config import Config, ConfigError, load_config
from pipeline.diffusion import SAMPLERS, make_sampler, make_train_scheduler
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline, ConditionalPipelineOutput

__all__ = [
    "SAMPLERS",
    "Config",
    "ConfigError",
    "ConditionalDiffusionPipeline",
    "ConditionalPipelineOutput",
    "ConditionalUNet",
    "load_config",
    "make_sampler",
    "make_train_scheduler",
]
