"""The U-Net a config asks for, at a data set's shape: what training and the benchmarks build.

Kept apart from ``unet.py``, which exports ship alone (torch and diffusers only): this module reads the project's
config and turns the model's own ValueErrors into ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.errors import ConfigError
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from pipeline.config import Config


def build_unet(cfg: Config, size: int, channels: int, class_names: list[str]) -> ConditionalUNet:
    """The U-Net for ``cfg.model`` on (``channels``, ``size``, ``size``) images of ``class_names``, with a null class
    when labels are dropped (``diffusion.p_uncond`` > 0) and a guidance embedding for a distilled student
    (``distill.teacher``). ConfigError for what it cannot do, ``sample.guidance_scale`` included."""
    try:
        unet = ConditionalUNet(**dataclasses.asdict(cfg.model), sample_size=size, in_channels=channels,
                               num_classes=len(class_names), class_names=class_names,
                               use_null_class=cfg.diffusion.p_uncond > 0, guidance_embedding=cfg.distill.teacher is not None)
    except ValueError as error:  # the model's own checks of its config (sizes, heads): bad input
        raise ConfigError(str(error)) from None
    sample = cfg.sample
    try:
        ConditionalDiffusionPipeline(unet=unet, scheduler=None).check_guidance(sample.guidance_scale, sample.guidance_interval,
                                                                               sample.guidance_ramp)
    except ValueError as error:  # the pipeline's guidance rule, now rather than at the first sample grid or export
        raise ConfigError(f"sample.{error}") from None
    return unet


def load_teacher(cfg: Config, student: ConditionalUNet, noise_scheduler: DDPMScheduler) -> ConditionalUNet:
    """The frozen U-Net (eval, no gradients) of the pipeline folder ``distill.teacher``, its weights copied into
    ``student`` (``build_unet``'s, whose guidance embedding stays as initialised). ConfigError, naming the fix, for a
    teacher that cannot teach it: no export there, no null class to guide with, a student or a learned variance,
    another schedule (``noise_scheduler``'s) or other classes, or weights that do not fit ``cfg.model``."""
    folder = Path(cfg.distill.teacher)
    where = f"distill.teacher {folder}"
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"{where}: no exported pipeline there (no model_index.json); pass a trained pipeline's folder")
    pipe = ConditionalDiffusionPipeline.from_pretrained(folder)
    teacher, scheduler = pipe.unet, pipe.scheduler
    problems = [
        (teacher.null_class is None, "was trained without a null class (diffusion.p_uncond 0), so it cannot be guided; "
                                     "distil a teacher trained with label dropout"),
        (teacher.config.guidance_embedding, "is a distilled student already; distil its teacher"),
        (teacher.config.learned_variance, "learns its variance, which distillation does not support; distil a teacher without it"),
        (scheduler.config.prediction_type != noise_scheduler.config.prediction_type
         or not torch.equal(scheduler.alphas_cumprod, noise_scheduler.alphas_cumprod),
         "was trained on another schedule or prediction type than diffusion.*; distil with the teacher's own config.yaml"),
        (pipe.class_names != list(student.config.class_names), f"has the classes {pipe.class_names}, the data set "
                                                               f"{student.config.class_names}; distil on the teacher's data.dataset"),
    ]
    if reason := next((reason for bad, reason in problems if bad), None):
        raise ConfigError(f"{where} {reason}")
    try:
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        fits = not unexpected and all(name.startswith("guidance_mlp.") for name in missing)
    except RuntimeError:  # a size mismatch
        fits = False
    if not fits:
        raise ConfigError(f"{where}: its weights do not fit model.* at the data set's shape; distil with the teacher's own "
                          "model section (its config.yaml, as python -m pipeline.distill does)")
    return teacher.requires_grad_(False).eval()


def parameter_groups(unet: ConditionalUNet, cfg: Config) -> list[dict]:
    """AdamW's parameter groups for ``unet``, each with its ``lr`` and ``lr_scale`` (its multiple of ``train.lr``, which
    ``training.resume.apply_optimisation`` keeps): one group, or for a distilled student the guidance embedding apart
    at ``distill.embedding_lr_scale``."""
    embedding = list(unet.guidance_mlp.parameters()) if unet.config.guidance_embedding else []
    scale = cfg.distill.embedding_lr_scale if embedding else 1.0
    if scale == 1.0:
        return [{"params": list(unet.parameters()), "lr": cfg.train.lr, "lr_scale": 1.0}]
    chosen = {id(parameter) for parameter in embedding}
    rest = [parameter for parameter in unet.parameters() if id(parameter) not in chosen]
    return [{"params": rest, "lr": cfg.train.lr, "lr_scale": 1.0},
            {"params": embedding, "lr": cfg.train.lr * scale, "lr_scale": scale}]
