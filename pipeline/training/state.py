"""``TrainingState``: what one start of a run trains and counts, built once by ``train`` and passed to its helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from diffusers import DDPMScheduler, SchedulerMixin
from diffusers.training_utils import EMAModel

from pipeline.checkpointing import Progress
from pipeline.models.unet import ConditionalUNet


@dataclass
class TrainingState:
    """The live objects of a run. ``model`` is what trains (DDP-wrapped by Accelerate, compiled if asked); ``unet``
    is the bare U-Net inside it, which the EMA, sample grids and exports read. ``progress`` is restored on resume.
    ``sampler`` is the scheduler that sample grids, evaluations and exports give the pipeline (the training DDPM one,
    or a distilled student's own sampler); ``teacher`` the frozen U-Net a student learns from (None: no distillation)."""

    accelerator: Accelerator
    model: torch.nn.Module
    unet: ConditionalUNet
    ema: EMAModel
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: AcceleratedScheduler  # accelerate's wrapper around diffusers' LambdaLR
    progress: Progress
    sampler: SchedulerMixin
    teacher: ConditionalUNet | None = None
