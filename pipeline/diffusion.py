"""Noise schedules, samplers and the training objective, on diffusers' schedulers.

- ``make_train_scheduler``: the DDPM forward process (linear or cosine betas, T steps) saved with the model.
- ``make_sampler`` / ``check_sampler``: any supported inference scheduler built from that config, with the
  upstream pitfalls either fixed (DPM-Solver on cosine needs ``lambda_min_clipped``) or refused.
- ``diffusion_loss``: the seed's simple epsilon-MSE, v-prediction, min-SNR-gamma weighting, and the Improved
  DDPM hybrid loss (``L_simple + L_vlb``) when the model learns its variance.
"""

from __future__ import annotations

import math

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from pipeline.config import DiffusionConfig

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}

# DPM-Solver's log-SNR lambda must not reach the cosine schedule's clipped tail (diffusers docs, #3320).
COSINE_LAMBDA_MIN_CLIPPED = -5.1


def make_train_scheduler(cfg: DiffusionConfig, learned_variance: bool = False) -> DDPMScheduler:
    """The forward process the model is trained on; also the pipeline's default (ancestral) sampler."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[cfg.schedule],
        prediction_type=cfg.prediction_type,
        variance_type="learned_range" if learned_variance else "fixed_small",
        clip_sample=True,
    )


def make_sampler(name: str, train_config: dict) -> SchedulerMixin:
    """An inference scheduler ``name`` (see ``SAMPLERS``) on the training schedule ``train_config``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    kwargs: dict = {}
    cosine = train_config.get("beta_schedule") == "squaredcos_cap_v2"
    if name == "dpmsolver++":
        kwargs = {"algorithm_type": "dpmsolver++", "solver_order": 2}
        if cosine:
            kwargs["lambda_min_clipped"] = COSINE_LAMBDA_MIN_CLIPPED
    if name in ("euler", "euler_a", "dpmsolver++", "unipc", "ddim"):
        kwargs["timestep_spacing"] = "trailing"  # start from t = T-1, not below it (Lin et al. 2023)
    if name != "ddpm":
        # the other samplers take only the mean prediction; a learned variance is DDPM's alone
        kwargs["variance_type"] = None
    scheduler = SAMPLERS[name].from_config(train_config, **kwargs)
    check_sampler(scheduler)
    return scheduler


def check_sampler(scheduler: SchedulerMixin) -> None:
    """Refuse scheduler settings known to produce broken images upstream, naming the fix."""
    config = scheduler.config
    cosine = config.get("beta_schedule") == "squaredcos_cap_v2"
    name = type(scheduler).__name__
    if cosine and config.get("use_karras_sigmas"):
        raise ValueError(
            f"{name} with use_karras_sigmas on the cosine schedule gives non-finite or washed-out images "
            "(its sigma_max is ~1e3); set use_karras_sigmas=False or train on the linear schedule"
        )
    if cosine and isinstance(scheduler, DPMSolverMultistepScheduler) and config.get("lambda_min_clipped", -math.inf) == -math.inf:
        raise ValueError(
            "DPMSolverMultistepScheduler on the cosine schedule needs lambda_min_clipped "
            f"(e.g. {COSINE_LAMBDA_MIN_CLIPPED}); build it with pipeline.diffusion.make_sampler('dpmsolver++', ...)"
        )


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``timesteps`` (B,)."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def diffusion_loss(
    model_output: torch.Tensor,
    clean: torch.Tensor,
    noise: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    cfg: DiffusionConfig,
) -> torch.Tensor:
    """Mean training loss of a batch.

    Args:
        model_output: (B, C, H, W), or (B, 2C, H, W) when the model learns its variance.
        clean, noise, noisy: (B, C, H, W) x_0, epsilon and x_t.
        timesteps: (B,) int64 in [0, T).
    """
    channels = clean.shape[1]
    prediction, variance = model_output.float(), None
    if model_output.shape[1] == 2 * channels:
        prediction, variance = prediction.split(channels, dim=1)
    target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, timesteps)
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    if cfg.loss_weighting == "min_snr":
        ratio = snr(scheduler, timesteps)
        clipped = ratio.clamp(max=cfg.snr_gamma)
        per_sample = per_sample * (clipped / ratio if cfg.prediction_type == "epsilon" else clipped / (ratio + 1))
    if variance is not None:
        # Improved DDPM: lambda = 0.001 on L_vlb = T * E_t[L_t], the mean frozen so L_vlb trains only the variance
        per_sample = per_sample + variational_bound(prediction.detach(), variance, clean, noisy, timesteps, scheduler, cfg) * (
            scheduler.config.num_train_timesteps / 1000.0
        )
    return per_sample.mean()


def variational_bound(
    prediction: torch.Tensor,
    variance: torch.Tensor,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    cfg: DiffusionConfig,
) -> torch.Tensor:
    """(B,) term L_t of the variational bound in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)),
    and -log p(x_0|x_1) (discretised Gaussian) at t = 0. ``variance`` in [-1, 1] interpolates the log variance
    between the posterior's and beta_t's, exactly as ``DDPMScheduler(variance_type="learned_range")`` samples."""
    alphas_cumprod = scheduler.alphas_cumprod.to(clean.device)
    shape = (-1, 1, 1, 1)
    alpha_bar = alphas_cumprod[timesteps].view(shape)
    previous = alphas_cumprod[(timesteps - 1).clamp(min=0)]
    alpha_bar_prev = torch.where(timesteps > 0, previous, torch.ones_like(previous)).view(shape)
    beta = 1 - alpha_bar / alpha_bar_prev
    coef_clean = beta * alpha_bar_prev.sqrt() / (1 - alpha_bar)
    coef_noisy = (1 - alpha_bar_prev) * (1 - beta).sqrt() / (1 - alpha_bar)
    posterior_mean = coef_clean * clean + coef_noisy * noisy
    posterior_log_var = ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).clamp(min=1e-20).log()

    if cfg.prediction_type == "epsilon":
        predicted_clean = (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    else:
        predicted_clean = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    model_mean = coef_clean * predicted_clean.clamp(-1, 1) + coef_noisy * noisy
    frac = (variance + 1) / 2
    model_log_var = frac * beta.log() + (1 - frac) * posterior_log_var

    kl = 0.5 * (-1.0 + model_log_var - posterior_log_var + (posterior_log_var - model_log_var).exp()
                + (posterior_mean - model_mean).pow(2) * (-model_log_var).exp())
    nll = -discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_log_var)
    per_pixel = torch.where(timesteps.view(shape) == 0, nll, kl)
    return per_pixel.mean(dim=(1, 2, 3)) / math.log(2.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit images x in [-1, 1] under N(mean, exp(log_scale)^2) integrated over each pixel's bin."""
    centered = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_minus = _standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_minus, (cdf_plus - cdf_minus).clamp(min=1e-12).log()),
    )
    return log_probs


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
