"""Scheduler settings known to produce broken images, refused with the fix named (docs/samplers.md has the evidence).

Self-contained (torch and diffusers only): exports ship this file beside ``pipeline_conditional.py``.
"""

from __future__ import annotations

import math

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    SchedulerMixin,
)

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}

# DPM-Solver's log-SNR lambda must not reach the cosine schedule's clipped tail (diffusers docs, #3320).
COSINE_LAMBDA_MIN_CLIPPED = -5.1

# Options that re-space sigmas; on the cosine schedule they crash or misindex upstream (diffusers #12771).
SIGMA_RESPACING = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def check_sampler(scheduler: SchedulerMixin) -> None:
    """Refuse scheduler settings known to produce broken images, naming the fix (see docs/samplers.md)."""
    config = scheduler.config
    name = type(scheduler).__name__
    if config.get("beta_schedule") != BETA_SCHEDULES["cosine"]:
        return
    if respaced := [option for option in SIGMA_RESPACING if config.get(option)]:
        raise ValueError(
            f"{name} with {respaced[0]}=True on the cosine schedule misindexes its timesteps (DPM-Solver, UniPC crash "
            "at >= 5 steps, diffusers #12771) or starts at sigma_max ~2e4; drop that option or train on the linear schedule"
        )
    if isinstance(scheduler, EulerAncestralDiscreteScheduler):
        raise ValueError(
            "EulerAncestralDiscreteScheduler on the cosine schedule returns NaN at some step counts (float32 "
            "cancellation in sigma_down at sigma_max ~2e4, diffusers #14213); use 'ddpm' (also ancestral) or 'dpmsolver++'"
        )
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        if config.get("lambda_min_clipped", -math.inf) == -math.inf:
            raise ValueError(
                "DPMSolverMultistepScheduler on the cosine schedule needs lambda_min_clipped "
                f"(e.g. {COSINE_LAMBDA_MIN_CLIPPED}); build it with pipeline.diffusion.make_sampler('dpmsolver++', ...)"
            )
        return  # lambda_min_clipped also keeps its first step away from sigma_max
    if config.get("prediction_type") == "epsilon" and not _clips_x0(scheduler):
        fix = (
            "use 'ddpm', 'ddim', 'dpmsolver++' or 'unipc' (pipeline.diffusion.make_sampler), or train with v_prediction"
            if isinstance(scheduler, EulerDiscreteScheduler)
            else "set thresholding=True (or clip_sample=True), e.g. with pipeline.diffusion.make_sampler"
        )
        raise ValueError(
            f"{name} without x_0 clipping on the cosine schedule with epsilon prediction multiplies the model's "
            f"epsilon error by sigma_max ~2e4 in its first step (garbage images); {fix}"
        )


def _clips_x0(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler`` clips (or dynamically thresholds) its x_0 prediction to the data range."""
    clip_sample = isinstance(scheduler, (DDPMScheduler, DDIMScheduler, LCMScheduler)) and scheduler.config.get("clip_sample")
    return bool(clip_sample or scheduler.config.get("thresholding"))
