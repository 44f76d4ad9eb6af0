"""Class-conditional DDPM training and sampling on Hugging Face diffusers and Accelerate.

Names are imported on first use, so ``import pipeline`` costs nothing until one is used. ``pipeline.config``
(with ``pipeline.names``, ``pipeline.guidance`` and ``pipeline.errors``) loads no torch, diffusers or datasets,
so a command line checks its arguments before its heavy imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Config": "pipeline.config",
    "ConfigError": "pipeline.errors",
    "load_config": "pipeline.config",
    "SAMPLERS": "pipeline.diffusion",
    "make_sampler": "pipeline.diffusion",
    "make_train_scheduler": "pipeline.diffusion",
    "ConditionalUNet": "pipeline.models.unet",
    "ConditionalDiffusionPipeline": "pipeline.pipeline_conditional",
    "ConditionalPipelineOutput": "pipeline.pipeline_conditional",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
