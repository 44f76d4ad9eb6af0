"""Noise schedules, samplers and the training objective, on diffusers' schedulers.

- ``make_train_scheduler``: the DDPM forward process (linear or cosine betas, T steps) saved with the model.
- ``make_sampler``: any supported inference scheduler built from that config, with the pitfalls either fixed
  (trailing spacing, x_0 clipping, ``lambda_min_clipped`` for DPM-Solver on cosine) or refused with the fix
  named by ``pipeline.sampler_checks.check_sampler`` (docs/samplers.md has the matrix and the evidence).
- ``diffusion_loss``: the seed's simple epsilon-MSE, v-prediction, min-SNR-gamma weighting, and the Improved
  DDPM hybrid loss (``L_simple + L_vlb``) when the model learns its variance.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from pipeline.config import DiffusionConfig, DistillConfig, SampleConfig
from pipeline.names import SAMPLER_NAMES
from pipeline.sampler_checks import BETA_SCHEDULES, COSINE_LAMBDA_MIN_CLIPPED, check_sampler

# The diffusers class of each sampler name, in the order of pipeline.names.SAMPLER_NAMES (which the config's
# sample.sampler choices come from; pipeline.names.REFUSED_SAMPLERS lists the combinations check_sampler refuses).
SAMPLERS: dict[str, type[SchedulerMixin]] = dict(zip(SAMPLER_NAMES, (
    DDPMScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
), strict=True))


def make_train_scheduler(cfg: DiffusionConfig, learned_variance: bool = False) -> DDPMScheduler:
    """The forward process the model is trained on; also the pipeline's default (ancestral) sampler."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[cfg.schedule],
        prediction_type=cfg.prediction_type,
        variance_type="learned_range" if learned_variance else "fixed_small",
        clip_sample=True,
        # start sampling at t = T-1 whatever the step count; "leading" starts below it and, at 1 step, at t = 0
        timestep_spacing="trailing",
    )


def make_sampler(name: str, train_config: dict) -> SchedulerMixin:
    """An inference scheduler ``name`` (see ``SAMPLERS``) on the training schedule ``train_config``.

    Every sampler starts at t = T-1 (``trailing`` spacing, Lin et al. 2023) and clips its x_0 prediction to
    the data range where the scheduler can (DDPM/DDIM ``clip_sample`` from the training config, DPM-Solver++
    and UniPC ``thresholding``). Combinations that stay broken are refused by ``check_sampler``;
    docs/samplers.md has the evidence.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    kwargs: dict = {"timestep_spacing": "trailing"}
    if name in ("dpmsolver++", "unipc"):
        kwargs.update(thresholding=True, sample_max_value=train_config.get("clip_sample_range", 1.0))
    if name == "dpmsolver++":
        # the learned variance is DDPM's alone; DPM-Solver would otherwise slice the output to 3 channels
        kwargs.update(algorithm_type="dpmsolver++", solver_order=2, variance_type=None)
        if train_config.get("beta_schedule") == BETA_SCHEDULES["cosine"]:
            kwargs["lambda_min_clipped"] = COSINE_LAMBDA_MIN_CLIPPED
    # only the keys the class takes: from_config warns about the others (LCM about DDPM's variance_type, say)
    taken = inspect.signature(SAMPLERS[name].__init__).parameters
    scheduler = SAMPLERS[name].from_config({key: value for key, value in train_config.items() if key in taken}, **kwargs)
    check_sampler(scheduler)
    return scheduler


def student_sampler(sample: SampleConfig, distill: DistillConfig, train_config: dict) -> SchedulerMixin:
    """The scheduler a distilled student samples with, and its export ships: ``sample.sampler`` (its method's, as
    ``config.validate`` checks) on the training schedule ``train_config``, LCM's on the teacher grid it learned."""
    return make_sampler(sample.sampler, {**train_config, "original_inference_steps": distill.teacher_steps})


def predicted_original(output: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                       prediction_type: str) -> torch.Tensor:
    """x_0 from an epsilon or v prediction ``output`` at ``noisy`` = alpha x_0 + sigma eps (alpha = sqrt(alpha_bar),
    sigma = sqrt(1 - alpha_bar), broadcastable to the (B, C, H, W) images)."""
    if prediction_type == "v_prediction":
        return alpha * noisy - sigma * output
    return (noisy - sigma * output) / alpha


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
    and -log p(x_0|x_1) (discretised Gaussian) at t = 0, with the variance of ``model_log_variance``."""
    alpha_bar, alpha_bar_prev = _alpha_bars(scheduler.alphas_cumprod.to(clean.device), timesteps)
    beta = 1 - alpha_bar / alpha_bar_prev
    coef_clean = beta * alpha_bar_prev.sqrt() / (1 - alpha_bar)
    coef_noisy = (1 - alpha_bar_prev) * (1 - beta).sqrt() / (1 - alpha_bar)
    posterior_mean = coef_clean * clean + coef_noisy * noisy
    posterior_log_var = _posterior_log_variance(scheduler, timesteps)

    predicted_clean = predicted_original(prediction, noisy, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), cfg.prediction_type)
    model_mean = coef_clean * predicted_clean.clamp(-1, 1) + coef_noisy * noisy
    model_log_var = model_log_variance(variance, timesteps, scheduler)

    kl = 0.5 * (-1.0 + model_log_var - posterior_log_var + (posterior_log_var - model_log_var).exp()
                + (posterior_mean - model_mean).pow(2) * (-model_log_var).exp())
    nll = -discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_log_var)
    per_pixel = torch.where(timesteps.view(-1, 1, 1, 1) == 0, nll, kl)
    return per_pixel.mean(dim=(1, 2, 3)) / math.log(2.0)


def model_log_variance(variance: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """log of the reverse variance that the variance channels (B, C, H, W), nominally in [-1, 1], stand for.

    They interpolate the log variance between the posterior's (-1) and beta_t's (+1), exactly as
    ``DDPMScheduler(variance_type="learned_range")`` samples for t > 0. At t = 0, where the posterior variance
    is 0 and the sampler adds no noise, the lower end is the posterior variance of t = 1, as in Improved DDPM
    (``posterior_log_variance_clipped``): log(1e-20) there would leave the decoder term without a gradient.
    """
    alpha_bar, alpha_bar_prev = _alpha_bars(scheduler.alphas_cumprod.to(variance.device), timesteps)
    frac = (variance + 1) / 2
    return frac * (1 - alpha_bar / alpha_bar_prev).log() + (1 - frac) * _posterior_log_variance(scheduler, timesteps)


def _posterior_log_variance(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) log variance of q(x_{t-1} | x_t, x_0), with t = 0 given t = 1's (it is 0 there)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)
    alpha_bar, alpha_bar_prev = _alpha_bars(alphas_cumprod, timesteps.clamp(min=1))
    return ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).log()


def _alpha_bars(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar_t, alpha_bar_{t-1}) as (B, 1, 1, 1), with alpha_bar_{-1} = 1."""
    previous = alphas_cumprod[(timesteps - 1).clamp(min=0)]
    alpha_bar_prev = torch.where(timesteps > 0, previous, torch.ones_like(previous))
    return alphas_cumprod[timesteps].view(-1, 1, 1, 1), alpha_bar_prev.view(-1, 1, 1, 1)


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
