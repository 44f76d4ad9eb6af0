"""The U-Net a config asks for, at a data set's shape: what training and the benchmarks build.

Kept apart from ``unet.py``, which exports ship alone (torch and diffusers only): this module reads the project's
config and turns the model's own ValueErrors into ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

if TYPE_CHECKING:
    from pipeline.config import Config


def build_unet(cfg: Config, size: int, channels: int, class_names: list[str]) -> ConditionalUNet:
    """The U-Net for ``cfg.model`` on (``channels``, ``size``, ``size``) images of ``class_names``, with a null class
    when labels are dropped (``diffusion.p_uncond`` > 0). ConfigError for what it cannot do, ``sample.guidance_scale``
    included."""
    try:
        unet = ConditionalUNet(**dataclasses.asdict(cfg.model), sample_size=size, in_channels=channels,
                               num_classes=len(class_names), class_names=class_names,
                               use_null_class=cfg.diffusion.p_uncond > 0)
    except ValueError as error:  # the model's own checks of its config (sizes, heads): bad input
        raise ConfigError(str(error)) from None
    sample = cfg.sample
    try:
        ConditionalDiffusionPipeline(unet=unet, scheduler=None).check_guidance(sample.guidance_scale, sample.guidance_interval,
                                                                               sample.guidance_ramp)
    except ValueError as error:  # the pipeline's guidance rule, now rather than at the first sample grid or export
        raise ConfigError(f"sample.{error}") from None
    return unet
