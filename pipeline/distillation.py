"""Targets and losses of guidance-aware few-step distillation (``distill.method``; docs/samplers.md has the pilots).

A student U-Net with the guidance scale w as an input (``ConditionalUNet(guidance_embedding=True)``, started from the
teacher's weights) learns from the frozen teacher guided at w, ``out = out_null + w (out_cond - out_null)`` (one
batched forward of the conditional and null rows), so that it samples at any w of ``distill.guidance_range`` with one
forward per step:

- ``consistency`` (Latent Consistency Models, Luo et al. 2023): on the teacher grid t_n = (n + 1) k - 1, k =
  T / ``distill.teacher_steps``, one guided teacher DDIM step takes x_{t_{n+1}} (the data noised) to x_{t_n}; the
  student's consistency function f(x, t) = c_skip(t) x + c_out(t) x_0(x, t), with LCMScheduler's c_skip and c_out
  (f(x, 0) = x), is pulled at (x_{t_{n+1}}, t_{n+1}) towards its own value at (x_{t_n}, t_n) without gradient (the
  stop-gradient target of improved consistency training) under the pseudo-Huber distance. LCMScheduler samples it in
  any number of steps up to ``teacher_steps``.
- ``segment`` (one round of progressive distillation, Salimans & Ho 2022, guided as in Meng et al. 2023): on DDIM's
  trailing grid of N = ``sample.num_inference_steps`` steps, the teacher solves each step t -> t' of the data noised
  at t with teacher_steps / N guided DPM-Solver++(2M) steps (``teacher_solve``, the sampler it is scored with), and
  the student learns the x_0 that makes one DDIM step land on the teacher's result,
  ``x_0* = (x_t' - (sigma_t'/sigma_t) x_t) / (alpha_t' - (sigma_t'/sigma_t) alpha_t)`` (the teacher's x_0 for the last
  step), in the teacher's own output (epsilon or v: the v loss is PD's SNR + 1 weighting).

Notation: x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), from the
student's sampler (LCMScheduler or DDIMScheduler on the training schedule); time -1 is DDIM's clean end (alpha_bar =
the sampler's ``final_alpha_cumprod``). The teacher's x_0 is clipped to [-1, 1] as its samplers clip it. Labels are
never dropped: a student is always asked for a class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, SchedulerMixin

from pipeline.config import Config
from pipeline.diffusion import predicted_original
from pipeline.models.unet import ConditionalUNet

Student = Callable[..., object]  # the training model (DDP-wrapped or compiled): student(x, t, labels, guidance=w).sample


def noise_coefficients(sampler: SchedulerMixin, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) as (B, 1, 1, 1) float32 for (B,) integer times ``t``; -1 is the clean end."""
    alphas_cumprod = sampler.alphas_cumprod.to(t.device)
    alpha_bar = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], sampler.final_alpha_cumprod.to(t.device)).float()
    return alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)


def guidance_scales(uniforms: torch.Tensor, guidance_range: tuple[float, float]) -> torch.Tensor:
    """(B,) guidance scales drawn uniformly from ``guidance_range`` (lo, hi), given (B,) uniforms in [0, 1)."""
    lo, hi = guidance_range
    return lo + (hi - lo) * uniforms


def ddim_step(x: torch.Tensor, x0: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor],
              end: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One DDIM step from ``x`` = alpha x_0 + sigma eps at ``start`` (alpha, sigma) to ``end``, given the x_0 estimate
    ``x0``: alpha' x0 + sigma' eps, eps re-derived from x0 (as the pipeline's DDIM does with a clipped x_0)."""
    (alpha, sigma), (alpha_end, sigma_end) = start, end
    return alpha_end * x0 + sigma_end * (x - alpha * x0) / sigma


def one_step_x0(x: torch.Tensor, x_end: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor],
                end: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The x_0 with which ``ddim_step`` takes ``x`` at ``start`` to ``x_end`` at ``end`` (its inverse in x0)."""
    (alpha, sigma), (alpha_end, sigma_end) = start, end
    ratio = sigma_end / sigma
    return (x_end - ratio * x) / (alpha_end - ratio * alpha)


def model_target(x0: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The epsilon or v output that predicts ``x0`` at ``x`` = alpha x_0 + sigma eps (``predicted_original``'s inverse)."""
    eps = (x - alpha * x0) / sigma
    return alpha * eps - sigma * x0 if prediction_type == "v_prediction" else eps


@torch.no_grad()
def guided_x0(teacher: ConditionalUNet, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
              sampler: SchedulerMixin) -> torch.Tensor:
    """The teacher's classifier-free-guided x_0 estimate, clipped to [-1, 1]: (B, C, H, W) ``x`` at (B,) times ``t``,
    (B,) ``labels`` and scales ``w``; the conditional and null rows share one forward."""
    null = torch.full_like(labels, teacher.null_class)
    output = teacher(torch.cat([x, x]).to(teacher.dtype), torch.cat([t, t]), torch.cat([labels, null])).sample.float()
    cond, uncond = output.chunk(2)
    guided = uncond + w.view(-1, 1, 1, 1) * (cond - uncond)
    return predicted_original(guided, x, *noise_coefficients(sampler, t), sampler.config.prediction_type).clamp(-1, 1)


def consistency_function(output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, sampler: SchedulerMixin) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x_0: the student's raw ``output`` at (B, C, H, W) ``x``, (B,) times ``t`` as
    LCMScheduler's ``step`` turns it into its ``denoised`` (before that step's clipping)."""
    c_skip, c_out = sampler.get_scalings_for_boundary_condition_discrete(t.float().view(-1, 1, 1, 1))
    return c_skip * x + c_out * predicted_original(output.float(), x, *noise_coefficients(sampler, t), sampler.config.prediction_type)


def pseudo_huber(difference: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of sqrt(|d|^2 + c^2) - c per image, c = 0.00054 sqrt(dimensions) (Song & Dhariwal 2023)."""
    c = 0.00054 * difference[0].numel() ** 0.5
    return ((difference.flatten(1).pow(2).sum(1) + c**2).sqrt() - c).mean()


def consistency_loss(student: Student, teacher: ConditionalUNet, clean: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor, w: torch.Tensor, sampler: SchedulerMixin, cfg: Config) -> torch.Tensor:
    """LCM's loss for a batch of (B, C, H, W) ``clean`` images noised by ``noise``; the (B,) ``timesteps`` (uniform in
    [0, T)) pick each image's step of the teacher grid."""
    teacher_steps = cfg.distill.teacher_steps
    skip = sampler.config.num_train_timesteps // teacher_steps
    start = (timesteps * teacher_steps // sampler.config.num_train_timesteps + 1) * skip - 1
    end = (start - skip).clamp(min=0)  # LCM's last step ends at t = 0, where f(x, 0) = x
    start_coefficients = noise_coefficients(sampler, start)
    noisy = start_coefficients[0] * clean + start_coefficients[1] * noise
    with torch.no_grad():
        x_end = ddim_step(noisy, guided_x0(teacher, noisy, start, labels, w, sampler), start_coefficients,
                          noise_coefficients(sampler, end))
        target = consistency_function(student(x_end, end, labels, guidance=w).sample, x_end, end, sampler)
    online = consistency_function(student(noisy, start, labels, guidance=w).sample, noisy, start, sampler)
    return pseudo_huber(online - target)


def log_snr_half(coefficients: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """lambda = log(alpha / sigma), DPM-Solver's time variable, for (alpha, sigma) with sigma > 0."""
    alpha, sigma = coefficients
    return alpha.log() - sigma.log()


def teacher_solve(teacher: ConditionalUNet, x: torch.Tensor, start: torch.Tensor, end: torch.Tensor, substeps: int,
                  labels: torch.Tensor, w: torch.Tensor, sampler: SchedulerMixin) -> torch.Tensor:
    """The guided teacher's solution at (B,) times ``end`` of (B, C, H, W) ``x`` at (B,) times ``start``, in ``substeps``
    steps at the integer times between them: DPM-Solver++(2M) (Lu et al. 2022), the solver the teacher is scored with,
    as diffusers' ``DPMSolverMultistepScheduler`` runs it (first order at the first step and into the clean end, x_0
    clipped). From t = T - 1 to the clean end in 20 steps it is that scheduler's 20-step sample."""
    previous = None  # (x_0, lambda) of the step before
    for j in range(1, substeps + 1):
        t, t_next = start - (start - end) * (j - 1) // substeps, start - (start - end) * j // substeps
        now, then = noise_coefficients(sampler, t), noise_coefficients(sampler, t_next)
        x0 = guided_x0(teacher, x, t, labels, w, sampler)
        x_next = ddim_step(x, x0, now, then)  # DPM-Solver++'s first-order step is DDIM's
        lam = log_snr_half(now)
        if previous is not None:  # the second-order correction, where the step does not end at the clean image
            x0_before, lam_before = previous
            ends_noisy = then[1] > 0
            lam_next = log_snr_half((then[0], then[1].clamp(min=1e-12)))
            h = lam_next - lam
            correction = -then[0] * torch.expm1(-h) * 0.5 * (x0 - x0_before) * h / (lam - lam_before)
            x_next = torch.where(ends_noisy, x_next + correction, x_next)
        previous, x = (x0, lam), x_next
    return x


def segment_loss(student: Student, teacher: ConditionalUNet, clean: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor, w: torch.Tensor, sampler: SchedulerMixin, cfg: Config) -> torch.Tensor:
    """One-round progressive distillation's loss for a batch, as ``consistency_loss`` takes it; the ``timesteps``
    pick each image's step of the student's DDIM grid."""
    grid = DDIMScheduler.from_config(sampler.config)  # a copy: the student's sampler is shared with the hooks
    grid.set_timesteps(cfg.sample.num_inference_steps, device=clean.device)
    total, steps = grid.config.num_train_timesteps, len(grid.timesteps)
    start = grid.timesteps[timesteps * steps // total]
    end = (start - total // steps).clamp(min=-1)  # DDIM's previous timestep; below 0 is the clean end
    substeps = cfg.distill.teacher_steps // steps
    start_coefficients = noise_coefficients(sampler, start)
    noisy = start_coefficients[0] * clean + start_coefficients[1] * noise
    with torch.no_grad():
        x = teacher_solve(teacher, noisy, start, end, substeps, labels, w, sampler)
        x0 = one_step_x0(noisy, x, start_coefficients, noise_coefficients(sampler, end))
        target = model_target(x0, noisy, *start_coefficients, sampler.config.prediction_type)
    output = student(noisy, start, labels, guidance=w).sample.float()
    return (output - target).pow(2).mean()


LOSSES = {"consistency": consistency_loss, "segment": segment_loss}


def distillation_loss(student: Student, teacher: ConditionalUNet, clean: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor, uniforms: torch.Tensor, sampler: SchedulerMixin, cfg: Config) -> torch.Tensor:
    """The mean loss of ``cfg.distill.method`` on a micro-batch: (B, C, H, W) ``clean`` images in [-1, 1], (B,) ``labels``,
    (B, C, H, W) ``noise``, (B,) ``timesteps`` in [0, T) and (B,) ``uniforms`` in [0, 1) (the guidance scales, by
    ``guidance_scales``) from the step's draws; ``sampler`` is the student's (``diffusion.student_sampler``)."""
    w = guidance_scales(uniforms, cfg.distill.guidance_range)
    return LOSSES[cfg.distill.method](student, teacher, clean, labels, noise, timesteps, w, sampler, cfg)
