"""The sampler matrix: every supported scheduler x schedule x prediction type, checked against an exact model.

For data x_0 ~ N(mu_y, s^2 I) (a point mass when s = 0) the minimum-MSE predictor is known in closed form,

    eps*(x_t, t, y) = sqrt(1 - a) (x_t - sqrt(a) mu_y) / (a s^2 + 1 - a),    a = alpha_bar_t,
    v*(x_t, t, y)   = sqrt(a) eps* - sqrt(1 - a) x_0*,    x_0* = (x_t - sqrt(1 - a) eps*) / sqrt(a),

so a correctly wired sampler must return mu_y (and a spread towards s) from it: a test of the scheduler
configuration, timestep spacing, input scaling and the v-prediction path, with no training. A perturbed
oracle (eps* + 0.05 N(0, 1), as a real network errs) shows which combinations amplify model error.
docs/samplers.md tabulates the results.
"""

from __future__ import annotations

import itertools
import typing

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.models.unets.unet_2d import UNet2DOutput

import pipeline.pipeline_conditional
from pipeline.config import DiffusionConfig, SamplerName
from pipeline.diffusion import SAMPLERS, make_sampler, make_train_scheduler
from pipeline.models.unet import ConditionalUNet
from pipeline.names import REFUSED_SAMPLERS, SAMPLER_NAMES
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.sampler_checks import COSINE_LAMBDA_MIN_CLIPPED, check_sampler
from tests.factories import single_threaded, tiny_unet

pytestmark = pytest.mark.usefixtures(single_threaded.__name__)

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v_prediction")
MATRIX = [
    (sampler, schedule, prediction, learned)
    for sampler, schedule, prediction in itertools.product(SAMPLERS, SCHEDULES, PREDICTIONS)
    for learned in ((False, True) if sampler == "ddpm" else (False,))
]
SUPPORTED = [case for case in MATRIX if case[:3] not in REFUSED_SAMPLERS]
REFUSED = [case for case in MATRIX if case[:3] in REFUSED_SAMPLERS]


def case_id(case: tuple) -> str:
    sampler, schedule, prediction, learned = case
    return f"{sampler}-{schedule}-{prediction}" + ("-learned_variance" if learned else "")


class GaussianOracle(ConditionalUNet):
    """The exact epsilon or v predictor for per-class Gaussian data, optionally with a model-like error."""

    def set_data(self, means: torch.Tensor, std: float, scheduler: SchedulerMixin, error: float = 0.0) -> None:
        self.means, self.std, self.error = means.double(), std, error
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.prediction_type = scheduler.config.prediction_type
        self.calls = 0

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, return_dict: bool = True
    ) -> UNet2DOutput:
        a = self.alphas_cumprod[torch.as_tensor(timestep).round().long()].reshape(-1, 1, 1, 1)
        x, mu = sample.double(), self.means[class_labels]
        output = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * self.std**2 + 1 - a)
        if self.prediction_type == "v_prediction":
            output = a.sqrt() * output - (1 - a).sqrt() * (x - (1 - a).sqrt() * output) / a.sqrt()
        if self.error:
            self.calls += 1
            generator = torch.Generator().manual_seed(self.calls)
            output = output + self.error * torch.randn(output.shape, generator=generator, dtype=output.dtype)
        if self.config.learned_variance:  # midway between the posterior variance and beta_t
            output = torch.cat([output, torch.zeros_like(output)], dim=1)
        return UNet2DOutput(sample=output.float())


def oracle_samples(
    scheduler: SchedulerMixin, std: float, steps: int, error: float = 0.0, learned: bool = False, per_class: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1] as (3, per_class, 1, 8, 8), class means (3, 1, 1, 8, 8)) sampled from the oracle."""
    means = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5
    oracle = GaussianOracle(sample_size=8, num_classes=3, base_channels=4, channel_mult=(1,), attention_resolutions=(),
                            attention_heads=1, learned_variance=learned)
    oracle.set_data(means, std, scheduler, error)
    pipe = ConditionalDiffusionPipeline(unet=oracle, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(3).repeat_interleave(per_class)
    images = pipe(class_labels=labels, num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    return (images * 2 - 1).view(3, per_class, 1, 8, 8), means[:, None]


def sampler_for(case: tuple) -> SchedulerMixin:
    sampler, schedule, prediction, learned = case
    return make_sampler(sampler, make_train_scheduler(DiffusionConfig(schedule=schedule, prediction_type=prediction), learned).config)


# --- what works ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SUPPORTED, ids=case_id)
def test_supported_sampler_recovers_the_data(case: tuple) -> None:
    learned = case[3]
    images, means = oracle_samples(sampler_for(case), std=0.0, steps=20, learned=learned, per_class=2)
    assert (images - means).abs().max() < 1e-3  # a point mass comes back exactly
    images, means = oracle_samples(sampler_for(case), std=0.2, steps=20, learned=learned)
    assert (images.mean(1) - means[:, 0]).abs().mean() < 0.03
    # 20 steps under-disperse (the last step jumps to a posterior mean); the spread must still be there
    assert 0.1 < images.std(1).mean() < 0.25


@pytest.mark.parametrize("case", SUPPORTED, ids=case_id)
@pytest.mark.parametrize("steps", [2, 5, 20])
def test_supported_sampler_does_not_amplify_model_error(case: tuple, steps: int) -> None:
    """With the oracle off by 0.05 per output, samples stay near the data (std 0.2), not saturated."""
    images, _ = oracle_samples(sampler_for(case), std=0.2, steps=steps, error=0.05, learned=case[3])
    assert images.std(1).mean() < 0.3


@pytest.mark.parametrize("case", SUPPORTED, ids=case_id)
def test_supported_sampler_gives_finite_images_from_a_unet(case: tuple) -> None:
    """A random (8x8) U-Net through the pipeline, guided, at 1 and 20 steps."""
    unet = tiny_unet(8, learned_variance=case[3], attention_resolutions=(4,))
    pipe = ConditionalDiffusionPipeline(unet=unet, scheduler=sampler_for(case))
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 20):
        images = pipe(class_labels=[0, 9], guidance_scale=3.0, num_inference_steps=steps, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


# --- what is refused, and why --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFUSED, ids=case_id)
def test_refused_sampler_names_the_problem_and_fix(case: tuple) -> None:
    with pytest.raises(ValueError, match=r"on the cosine schedule .*; use .*'dpmsolver\+\+'"):
        sampler_for(case)


def test_config_refuses_exactly_what_make_sampler_refuses() -> None:
    assert tuple(SAMPLERS) == SAMPLER_NAMES == typing.get_args(SamplerName)
    assert {case[:3] for case in REFUSED} == set(REFUSED_SAMPLERS)


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the pipeline run schedulers that check_sampler refuses, to show what they do."""
    monkeypatch.setattr(pipeline.pipeline_conditional, "check_sampler", lambda scheduler: None)


def cosine_config(prediction: str = "epsilon") -> dict:
    return make_train_scheduler(DiffusionConfig(schedule="cosine", prediction_type=prediction)).config


@pytest.mark.usefixtures("unchecked")
@pytest.mark.parametrize(
    "scheduler",
    [
        EulerDiscreteScheduler.from_config(cosine_config(), timestep_spacing="trailing"),
        UniPCMultistepScheduler.from_config(cosine_config(), timestep_spacing="trailing"),
        DPMSolverMultistepScheduler.from_config(cosine_config(), timestep_spacing="trailing"),
        DDIMScheduler.from_config(cosine_config(), timestep_spacing="trailing", clip_sample=False),
    ],
    ids=["euler", "unipc-without-thresholding", "dpmsolver++-without-lambda-clip", "ddim-without-clip"],
)
def test_without_clipping_cosine_epsilon_amplifies_model_error(scheduler: SchedulerMixin) -> None:
    """The first step from sigma_max ~2e4 multiplies a 0.05 error in epsilon into saturated images."""
    images, _ = oracle_samples(scheduler, std=0.2, steps=20, error=0.05)
    assert images.std(1).mean() > 0.5


@pytest.mark.usefixtures("unchecked")
def test_euler_ancestral_on_cosine_returns_nan_upstream() -> None:
    """diffusers #14213: sigma_to**2 - sigma_up**2 < 0 in float32 after sigma_max ~2e4 (here at 3 steps)."""
    scheduler = EulerAncestralDiscreteScheduler.from_config(cosine_config("v_prediction"), timestep_spacing="trailing")
    images, _ = oracle_samples(scheduler, std=0.2, steps=3)
    assert images.isnan().all()


@pytest.mark.usefixtures("unchecked")
def test_karras_sigmas_on_cosine_crash_upstream() -> None:
    """diffusers #12771: timesteps near T collapse onto one integer and the step index runs off the end."""
    scheduler = DPMSolverMultistepScheduler.from_config(cosine_config(), use_karras_sigmas=True,
                                                        lambda_min_clipped=COSINE_LAMBDA_MIN_CLIPPED)
    with pytest.raises(IndexError):
        oracle_samples(scheduler, std=0.2, steps=20)


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        (DPMSolverMultistepScheduler.from_config(cosine_config(), use_karras_sigmas=True, lambda_min_clipped=-5.1),
         r"use_karras_sigmas=True on the cosine schedule misindexes its timesteps"),
        (UniPCMultistepScheduler.from_config(cosine_config(), use_exponential_sigmas=True, thresholding=True),
         r"use_exponential_sigmas=True on the cosine schedule"),
        (EulerDiscreteScheduler.from_config(cosine_config("v_prediction"), use_beta_sigmas=True), r"use_beta_sigmas=True"),
        (DPMSolverMultistepScheduler.from_config(cosine_config()), r"needs lambda_min_clipped \(e\.g\. -5\.1\)"),
        (EulerAncestralDiscreteScheduler.from_config(cosine_config("v_prediction")), r"NaN at some step counts .*#14213"),
        (EulerDiscreteScheduler.from_config(cosine_config()), r"multiplies the model's epsilon error .* or train with v_prediction"),
        (UniPCMultistepScheduler.from_config(cosine_config()), r"multiplies the model's epsilon error .* set thresholding=True"),
        (DDIMScheduler.from_config(cosine_config(), clip_sample=False), r"DDIMScheduler without x_0 clipping"),
    ],
    ids=["karras", "exponential", "beta", "dpm-lambda", "euler-ancestral", "euler-epsilon", "unipc-epsilon", "ddim-no-clip"],
)
def test_check_sampler_refuses_broken_settings(scheduler: SchedulerMixin, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_sampler(scheduler)


def test_check_sampler_accepts_what_works() -> None:
    linear = make_train_scheduler(DiffusionConfig()).config
    for scheduler in (
        DPMSolverMultistepScheduler.from_config(linear, use_karras_sigmas=True),
        EulerAncestralDiscreteScheduler.from_config(linear),
        EulerDiscreteScheduler.from_config(cosine_config("v_prediction")),
        UniPCMultistepScheduler.from_config(cosine_config(), thresholding=True),
        DDIMScheduler.from_config(cosine_config()),  # clip_sample=True comes from the training config
    ):
        check_sampler(scheduler)


def test_unknown_sampler_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown sampler 'heun'; choose one of ddpm, ddim, dpmsolver\+\+, unipc, euler, euler_a"):
        make_sampler("heun", make_train_scheduler(DiffusionConfig()).config)


# --- how make_sampler configures them ------------------------------------------------------------------------


@pytest.mark.parametrize("case", SUPPORTED, ids=case_id)
def test_every_sampler_starts_at_the_last_training_step(case: tuple) -> None:
    """Trailing spacing: 1 step denoises from t = T-1 (leading spacing would start, and stay, at t = 0);
    DPM-Solver on cosine from the last t whose log-SNR / 2 is >= lambda_min_clipped."""
    scheduler = sampler_for(case)
    first = 999
    if isinstance(scheduler, DPMSolverMultistepScheduler) and case[1] == "cosine":
        alpha_bar = scheduler.alphas_cumprod
        first = int((0.5 * (alpha_bar / (1 - alpha_bar)).log() >= COSINE_LAMBDA_MIN_CLIPPED).nonzero().max())
        assert first > 990
    for steps in (1, 20):
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps[0] == first and len(scheduler.timesteps) == steps


def test_dpm_solver_settings() -> None:
    linear = make_sampler("dpmsolver++", make_train_scheduler(DiffusionConfig(), learned_variance=True).config)
    cosine = make_sampler("dpmsolver++", cosine_config())
    assert linear.config.algorithm_type == "dpmsolver++" and linear.config.variance_type is None
    assert linear.config.lambda_min_clipped == float("-inf") and cosine.config.lambda_min_clipped == COSINE_LAMBDA_MIN_CLIPPED
    assert linear.config.thresholding and linear.config.sample_max_value == 1.0
