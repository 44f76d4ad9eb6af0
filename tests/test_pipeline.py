"""ConditionalDiffusionPipeline: outputs, determinism, classifier-free guidance and its schedules over the steps,
labels, save/load, bad input."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from pipeline.config import DiffusionConfig, SampleConfig
from pipeline.diffusion import SAMPLERS, make_sampler, make_train_scheduler
from pipeline.guidance import check_guidance_settings, guidance_weights
from pipeline.models.unet import ConditionalUNet
from pipeline.names import SAMPLING_PRECISIONS
from pipeline.pipeline_conditional import PRECISIONS, ConditionalDiffusionPipeline, ConditionalPipelineOutput, native_bf16, noise_levels
from pipeline.sampling import generate, sample_images, to_uint8
from tests.factories import IMAGE_SHAPES, single_threaded, tiny_unet

pytestmark = pytest.mark.usefixtures(single_threaded.__name__)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STEPS = 4


def make_pipe(unet: ConditionalUNet, learned_variance: bool = False) -> ConditionalDiffusionPipeline:
    pipe = ConditionalDiffusionPipeline(unet=unet, scheduler=make_train_scheduler(DiffusionConfig(), learned_variance))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe() -> ConditionalDiffusionPipeline:
    """MNIST-shaped, trained with label dropout (has a null class)."""
    return make_pipe(tiny_unet())


def sample(pipe: ConditionalDiffusionPipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] from ``pipe`` at ``STEPS`` steps, in the model's dtype (no autocast: the tests
    compare samples bit for bit with hand-written loops)."""
    kwargs = {"class_labels": [1, 7], "num_inference_steps": STEPS, "output_type": "pt", "mixed_precision": "no"} | kwargs
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def public(config: dict) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


class ForwardSpy:
    """Replaces ``unet.forward``, recording the labels of every call."""

    def __init__(self, unet: ConditionalUNet, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forward, self.labels = unet.forward, []
        monkeypatch.setattr(unet, "forward", self)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, **kwargs: Any) -> Any:
        self.labels.append(class_labels.clone())
        return self.forward(sample, timestep, class_labels, **kwargs)


# --- outputs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", IMAGE_SHAPES)
def test_output_types_and_shapes(dataset: str) -> None:
    size, channels = IMAGE_SHAPES[dataset]
    pipe = make_pipe(tiny_unet(size, channels))
    out = pipe(class_labels=[0, 1], num_images_per_label=2, num_inference_steps=STEPS, output_type="np")
    assert isinstance(out, ConditionalPipelineOutput)
    assert out.images.shape == (4, size, size, channels) and out.images.dtype == np.float32
    assert 0 <= out.images.min() and out.images.max() <= 1
    assert out.class_labels.tolist() == [0, 0, 1, 1] and out.intermediates is None
    images = sample(pipe, class_labels=3, output_type="pt")
    assert images.shape == (1, channels, size, size) and images.dtype == torch.float32
    (image,) = pipe(class_labels=3, num_inference_steps=STEPS, output_type="pil").images
    assert isinstance(image, PIL.Image.Image) and image.size == (size, size) and image.mode == ("L", "RGB")[channels == 3]
    (tupled,) = pipe(class_labels=3, num_inference_steps=STEPS, output_type="pt", return_dict=False)
    assert tupled.shape == images.shape


def test_deterministic_under_a_seed(pipe: ConditionalDiffusionPipeline) -> None:
    first = sample(pipe, seed=1, guidance_scale=2.0)
    assert torch.equal(first, sample(pipe, seed=1, guidance_scale=2.0))
    assert not torch.equal(first, sample(pipe, seed=2, guidance_scale=2.0))


@pytest.mark.parametrize("sampler", ["ddpm", "dpmsolver++"])
def test_intermediates_are_the_predicted_x0_of_each_step(pipe: ConditionalDiffusionPipeline, sampler: str) -> None:
    """DDPM returns x_0 from its step; DPM-Solver does not, and the pipeline computes it from the output."""
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    out = pipe(class_labels=[2], num_inference_steps=STEPS, output_type="pt", return_intermediates=True,
               generator=torch.Generator().manual_seed(0))
    assert len(out.intermediates) == STEPS and all(x.shape == (1, 1, 28, 28) for x in out.intermediates)
    torch.testing.assert_close(out.intermediates[-1], out.images, atol=1e-4, rtol=0)  # the last step lands on x_0


def test_ddim_re_derives_epsilon_from_the_clipped_x0(pipe: ConditionalDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """With clip_sample and the raw epsilon, DDIM greys MNIST's background out (docs/samplers.md)."""
    pipe.scheduler = make_sampler("ddim", pipe.scheduler.config)
    assert pipe.scheduler.config.clip_sample
    calls = []
    step = pipe.scheduler.step

    @functools.wraps(step)  # keeps the signature the pipeline inspects
    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return step(*args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", spy)
    sample(pipe)
    assert len(calls) == STEPS and all(kwargs["use_clipped_model_output"] for kwargs in calls)


def test_progress_bar(pipe: ConditionalDiffusionPipeline, capsys: pytest.CaptureFixture) -> None:
    pipe.set_progress_bar_config(disable=False)
    sample(pipe)
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err


def test_bf16_model_samples_in_float32(pipe: ConditionalDiffusionPipeline) -> None:
    full = sample(pipe)
    pipe.unet.to(torch.bfloat16)
    half = sample(pipe)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().mean() < 0.05


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision", ["auto", "no", "bf16"])
def test_mixed_precision_runs_the_unet_under_bf16_autocast_where_asked(pipe: ConditionalDiffusionPipeline, precision: str,
                                                                       model_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22: the README's call ran float32 where ``generate`` ran bf16 (2x slower on this CPU). ``auto``: bf16
    autocast for a float32 model where the hardware has native bf16, none for a model already in a 16-bit dtype;
    ``bf16`` and ``no`` force it on or off. The outputs are float32 whatever ran."""
    pipe.unet.to(model_dtype)
    autocast = []
    forward = pipe.unet.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        autocast.append(torch.is_autocast_enabled("cpu"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", recording)
    images = sample(pipe, mixed_precision=precision, guidance_scale=2.0)
    latents = sample(pipe, mixed_precision=precision, output_type="latent")
    expected = {"bf16": True, "no": False, "auto": model_dtype == torch.float32 and native_bf16(torch.device("cpu"))}[precision]
    assert autocast == [expected] * (2 * STEPS)
    assert images.dtype == latents.dtype == torch.float32 and torch.isfinite(images).all()


def test_auto_precision_is_the_default_and_samples_as_generate(pipe: ConditionalDiffusionPipeline) -> None:
    """``pipe(...)`` and ``generate`` share one precision rule: the same images, at the default ``auto``."""
    settings = SampleConfig(sampler="ddim", num_inference_steps=STEPS, guidance_scale=2.0)
    generated = generate(pipe, per_class=1, sample=settings, seed=5, batch_size=10)
    called = sample_images(pipe, settings, list(range(10)), seed=5 * 1_000_003, output_type="pt").images
    assert torch.equal(generated.images, to_uint8(called))
    with pytest.raises(ValueError, match="mixed_precision 'fp16' unknown; use 'auto', 'no', 'bf16'"):
        sample(pipe, mixed_precision="fp16")
    assert PRECISIONS == SAMPLING_PRECISIONS  # the torch-free copy, for configs and the command lines


def test_sampling_is_a_plain_scheduler_loop(pipe: ConditionalDiffusionPipeline) -> None:
    """With guidance 1 the pipeline is the textbook loop over the conditional model alone."""
    labels = torch.tensor([1, 7])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 28, 28, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t, labels).sample, t, x, generator=generator).prev_sample
    assert torch.equal(sample(pipe, class_labels=labels), (x / 2 + 0.5).clamp(0, 1))


def test_latents_argument_starts_from_the_given_noise(pipe: ConditionalDiffusionPipeline) -> None:
    """The noise a seed draws, passed as ``latents``, gives that seed's images (DPM-Solver adds no noise later)."""
    pipe.scheduler = make_sampler("dpmsolver++", pipe.scheduler.config)
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    given = pipe(class_labels=[1, 7], latents=noise, num_inference_steps=STEPS, output_type="pt", mixed_precision="no").images
    assert torch.equal(given, sample(pipe))


def test_latent_output_is_the_final_sample_in_model_range(pipe: ConditionalDiffusionPipeline) -> None:
    latent = sample(pipe, output_type="latent")
    assert torch.equal((latent / 2 + 0.5).clamp(0, 1), sample(pipe)) and latent.min() < 0


def test_step_callback_sees_and_replaces_the_sample(pipe: ConditionalDiffusionPipeline) -> None:
    steps = []

    def zero_at_the_end(p: ConditionalDiffusionPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        steps.append((i, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == p.num_timesteps - 1 else tensors

    images = sample(pipe, callback_on_step_end=zero_at_the_end, output_type="latent")
    assert steps == [(i, (2, 1, 28, 28)) for i in range(STEPS)] and not images.any()
    assert pipe.num_timesteps == STEPS and pipe.guidance_scale == 1.0


def test_interrupt_skips_the_remaining_steps(pipe: ConditionalDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(p: ConditionalDiffusionPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        p._interrupt = True
        return tensors

    spy = ForwardSpy(pipe.unet, monkeypatch)
    sample(pipe, callback_on_step_end=stop)
    assert len(spy.labels) == 1 and pipe.interrupt


# --- classifier-free guidance ---------------------------------------------------------------------------------


def test_guidance_one_is_the_conditional_model_alone(pipe: ConditionalDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor(500), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.equal(pipe.predict_noise(x, t, labels, guidance_scale=1.0), pipe.unet(x, t, labels).sample)
    spy = ForwardSpy(pipe.unet, monkeypatch)
    sample(pipe, guidance_scale=1.0)
    assert len(spy.labels) == STEPS
    assert all(seen.tolist() == [1, 7] for seen in spy.labels)  # the null class is never evaluated


@pytest.mark.parametrize("learned_variance", [False, True], ids=["mean", "learned_variance"])
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guidance_formula_in_one_batched_forward(monkeypatch: pytest.MonkeyPatch, scale: float, learned_variance: bool) -> None:
    """output = uncond + s * (cond - uncond); a learned variance comes from the conditional half."""
    pipe = make_pipe(tiny_unet(learned_variance=learned_variance), learned_variance)
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor(500), torch.tensor([1, 7])
    with torch.no_grad():
        cond = pipe.unet(x, t, labels).sample
        uncond = pipe.unet(x, t, torch.full_like(labels, 10)).sample
    spy = ForwardSpy(pipe.unet, monkeypatch)
    with torch.no_grad():
        guided = pipe.predict_noise(x, t, labels, guidance_scale=scale)
    assert [seen.tolist() for seen in spy.labels] == [[1, 7, 10, 10]]
    torch.testing.assert_close(guided[:, :1], uncond[:, :1] + scale * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(guided[:, 1:], cond[:, 1:])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_learned_variance_model_with_any_sampler(sampler: str) -> None:
    """DDPM reads the variance channels; the others, built straight from the saved config (which says
    variance_type="learned_range"), get only the mean's C channels."""
    pipe = make_pipe(tiny_unet(learned_variance=True), learned_variance=True)
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    images = sample(pipe, guidance_scale=2.0)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


# --- guidance over the steps: interval and ramps -----------------------------------------------------------------


def linear_schedule_sigmas(timesteps: list[int]) -> list[float]:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of DDPM's linear schedule (betas 1e-4..0.02, T = 1000), in float64."""
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[timesteps]
    return np.sqrt((1 - alpha_bar) / alpha_bar).tolist()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_noise_levels_are_the_sigma_of_each_step(sampler: str) -> None:
    """The same sigma for every sampler, whether its timesteps are ints or (Euler) floats, and for those that keep
    their own sigmas, theirs."""
    scheduler = make_sampler(sampler, make_train_scheduler(DiffusionConfig()).config)
    scheduler.set_timesteps(7)
    levels = noise_levels(scheduler)
    assert levels == pytest.approx(linear_schedule_sigmas([int(t) for t in scheduler.timesteps]), rel=1e-4)
    assert levels[0] == pytest.approx(157.4, abs=0.1) and levels == sorted(levels, reverse=True)
    if hasattr(scheduler, "sigmas"):  # DPM-Solver, UniPC, Euler: (n + 1,) ending in 0
        assert levels == pytest.approx(scheduler.sigmas[:-1].tolist(), rel=1e-5)


def test_noise_levels_of_fractional_timesteps_round_to_a_training_step() -> None:
    """Euler with Karras sigmas steps at fractional timesteps; sigma is read at the nearest training step."""
    scheduler = EulerDiscreteScheduler.from_config(make_train_scheduler(DiffusionConfig()).config, use_karras_sigmas=True)
    scheduler.set_timesteps(5)
    assert any(t != round(t) for t in scheduler.timesteps.tolist())
    assert noise_levels(scheduler) == pytest.approx(scheduler.sigmas[:-1].tolist(), rel=1e-2)


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_ramps_average_the_scale_and_are_monotone(steps: int, scale: float) -> None:
    sigmas = np.geomspace(150.0, 0.02, steps).tolist()
    assert guidance_weights(scale, sigmas) == [scale] * steps
    increasing = guidance_weights(scale, sigmas, ramp="increasing")
    decreasing = guidance_weights(scale, sigmas, ramp="decreasing")
    for weights, rising in ((increasing, scale >= 1), (decreasing, scale < 1)):
        assert sum(weights) / steps == pytest.approx(scale)
        assert weights == sorted(weights, reverse=not rising)
    assert decreasing == pytest.approx(increasing[::-1])
    if steps > 1:  # from no guidance to 2s - 1
        assert increasing[0] == 1.0 and increasing[-1] == pytest.approx(2 * scale - 1)
    if scale == 1.0:
        assert increasing == decreasing == [1.0] * steps


def test_interval_is_open_below_and_closed_above() -> None:
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.5]
    assert guidance_weights(3.0, sigmas, (1.0, 5.0)) == [1.0, 3.0, 3.0, 1.0, 1.0]
    assert guidance_weights(3.0, sigmas, (0.0, math.inf)) == [3.0] * 5
    assert guidance_weights(3.0, sigmas, (20.0, math.inf)) == [1.0] * 5
    # the ramp runs over all the steps; inside the interval a step keeps its weight (1 + i at s = 3, n = 5)
    assert guidance_weights(3.0, sigmas, (1.0, 5.0), "increasing") == [1.0, 2.0, 3.0, 1.0, 1.0]


@pytest.mark.parametrize("sampler", ["ddpm", "dpmsolver++", "euler"])
def test_interval_of_no_step_is_no_guidance_and_of_every_step_is_constant_guidance(pipe: ConditionalDiffusionPipeline,
                                                                                    sampler: str) -> None:
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    assert torch.equal(sample(pipe, guidance_scale=3.0, guidance_interval=(1e4, math.inf)), sample(pipe, guidance_scale=1.0))
    guided = sample(pipe, guidance_scale=3.0)
    assert torch.equal(sample(pipe, guidance_scale=3.0, guidance_interval=(0.0, math.inf)), guided)
    assert not torch.equal(guided, sample(pipe, guidance_scale=1.0))


def test_ramp_at_scale_one_is_no_guidance_and_above_differs_from_constant(pipe: ConditionalDiffusionPipeline) -> None:
    plain = sample(pipe, guidance_scale=1.0)
    for ramp in ("increasing", "decreasing"):
        assert torch.equal(sample(pipe, guidance_scale=1.0, guidance_ramp=ramp), plain)
    constant = sample(pipe, guidance_scale=3.0)
    increasing = sample(pipe, guidance_scale=3.0, guidance_ramp="increasing")
    decreasing = sample(pipe, guidance_scale=3.0, guidance_ramp="decreasing")
    assert not torch.allclose(increasing, constant) and not torch.allclose(decreasing, constant)
    assert not torch.allclose(increasing, decreasing)


def test_null_class_forwards_run_only_inside_the_interval(pipe: ConditionalDiffusionPipeline) -> None:
    """Steps outside the interval run one forward of the N conditional images; those inside, 2N with the null class."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    sigmas = noise_levels(scheduler)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[2].tolist()))
    try:
        sample(pipe, guidance_scale=3.0, guidance_interval=(sigmas[2], sigmas[0]))  # steps 0 and 1: (sigma_2, sigma_0]
    finally:
        hook.remove()
    assert seen == [[1, 7, 10, 10], [1, 7, 10, 10], [1, 7], [1, 7]]


def test_a_step_callback_that_changes_the_scale_changes_the_remaining_weights(pipe: ConditionalDiffusionPipeline) -> None:
    """diffusers' convention: ``guidance_scale`` is the requested s, and a callback may change it mid-run."""
    def stop_guiding(p: ConditionalDiffusionPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        p._guidance_scale = 1.0
        return tensors

    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(len(args[2])))
    try:
        sample(pipe, guidance_scale=3.0, guidance_ramp="decreasing", callback_on_step_end=stop_guiding)
    finally:
        hook.remove()
    assert seen == [4] + [2] * (STEPS - 1) and pipe.guidance_scale == 1.0


def test_sample_images_passes_the_guidance_schedule_through(pipe: ConditionalDiffusionPipeline) -> None:
    schedule = {"guidance_scale": 3.0, "guidance_interval": (0.5, 50.0), "guidance_ramp": "increasing"}
    settings = SampleConfig(sampler="dpmsolver++", num_inference_steps=STEPS, **schedule)
    images = sample_images(pipe, settings, [1, 7], seed=0, output_type="pt", mixed_precision="no").images
    pipe.scheduler = make_sampler("dpmsolver++", pipe.scheduler.config)
    assert torch.equal(images, sample(pipe, **schedule))
    assert not torch.equal(images, sample(pipe, guidance_scale=3.0))


# --- labels ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "given", "expected"),
    [
        (None, ["3", "7"], [3, 7]),
        (None, [np.int64(3), "7"], [3, 7]),
        (None, torch.tensor([3, 7]), [3, 7]),
        (CIFAR10_NAMES, ["cat", "truck"], [3, 9]),
        (CIFAR10_NAMES, ["cat", 9], [3, 9]),
    ],
    ids=["digit-names", "numpy-and-name", "tensor", "cifar-names", "mixed"],
)
def test_labels_as_names_ints_or_tensor(names: list[str] | None, given, expected: list[int]) -> None:
    pipe = make_pipe(tiny_unet(class_names=names))
    out = pipe(class_labels=given, num_inference_steps=STEPS, output_type="pt", generator=torch.Generator().manual_seed(0),
               mixed_precision="no")
    assert out.class_labels.tolist() == expected
    assert torch.equal(out.images, sample(pipe, class_labels=expected))


def test_num_images_per_label_repeats_each_label(pipe: ConditionalDiffusionPipeline) -> None:
    assert pipe.label_tensor([5, "2"], num_images_per_label=3).tolist() == [5, 5, 5, 2, 2, 2]


def test_nested_labels_are_flattened_as_in_dit(pipe: ConditionalDiffusionPipeline) -> None:
    """diffusers' batch tests pass ``[[1], [1]]``; DiT reshapes its labels to (N,)."""
    assert pipe.label_tensor([[1], [7, "3"], (np.int64(2),)]).tolist() == [1, 7, 3, 2]


# --- save / load ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    pipe = make_pipe(tiny_unet(32, 3, class_names=CIFAR10_NAMES, conditioning="scale_shift"))
    pipe.save_pretrained(tmp_path)
    loaded = ConditionalDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, ConditionalUNet) and type(loaded.scheduler) is type(pipe.scheduler)
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in pipe.unet.state_dict().items())
    assert loaded.class_names == CIFAR10_NAMES
    for sampler in ("ddpm", "dpmsolver++"):
        pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
        loaded.scheduler = make_sampler(sampler, loaded.scheduler.config)
        kwargs = {"class_labels": ["cat", "ship"], "guidance_scale": 2.0}
        assert torch.equal(sample(loaded, **kwargs), sample(pipe, **kwargs))


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_labels": 10}, r"class label 10 out of range; valid labels are 0\.\.9"),
        ({"class_labels": [3, -1]}, r"class label -1 out of range; valid labels are 0\.\.9"),
        ({"class_labels": ["3", "ten"]}, r"unknown class name 'ten'; valid names: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"),
        ({"class_labels": []}, r"class_labels is empty"),
        ({"class_labels": [1.5]}, r"class label 1\.5 must be an int in 0\.\.9"),
        ({"class_labels": torch.tensor([1.0])}, r"class label 1\.0 must be an int in 0\.\.9"),
        ({"class_labels": [True]}, r"class label True must be an int"),
        ({"class_labels": 1, "num_images_per_label": 0}, r"num_images_per_label must be >= 1, got 0"),
        ({"class_labels": 1, "num_inference_steps": 0}, r"num_inference_steps must be >= 1, got 0"),
        ({"class_labels": 1, "num_inference_steps": 1001}, r"cannot be larger than"),
        ({"class_labels": 1, "output_type": "jpeg"}, r"output_type 'jpeg' unknown; use 'pil', 'np', 'pt' or 'latent'"),
        ({"class_labels": [1, 2], "latents": torch.zeros(1, 1, 28, 28)},
         r"latents have shape \(1, 1, 28, 28\); 2 images of this model need \(2, 1, 28, 28\)"),
        ({"class_labels": 1, "callback_on_step_end_tensor_inputs": ["noise"]},
         r"callback_on_step_end_tensor_inputs \['noise'\] unknown; choose from \['latents'\]"),
        ({"class_labels": 1, "guidance_scale": -1.0}, r"guidance_scale must be >= 0, got -1\.0"),
        ({"class_labels": 1, "guidance_scale": float("nan")}, r"guidance_scale must be finite, got nan"),
        ({"class_labels": 1, "guidance_interval": (5.0, 1.0)}, r"guidance_interval \(lo, hi\) needs 0 <= lo < hi .*got \(5\.0, 1\.0\)"),
        ({"class_labels": 1, "guidance_interval": (-1.0, 1.0)}, r"guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
        ({"class_labels": 1, "guidance_interval": (float("nan"), 1.0)}, r"guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
        ({"class_labels": 1, "guidance_interval": (0.3,)}, r"guidance_interval must be two noise levels \(lo, hi\)"),
        ({"class_labels": 1, "guidance_interval": "0.3,5"}, r"guidance_interval must be two noise levels \(lo, hi\)"),
        ({"class_labels": 1, "guidance_ramp": "linear"}, r"guidance_ramp 'linear' unknown; choose one of constant, increasing, decreasing"),
        ({"class_labels": 1, "guidance_scale": 0.2, "guidance_ramp": "increasing"},
         r"guidance_ramp 'increasing' at guidance_scale 0\.2 gives steps the negative weight -0\.6 .* use guidance_scale >= 0\.5"),
    ],
    ids=["label-high", "label-negative", "unknown-name", "empty", "float", "float-tensor", "bool", "per-label",
         "steps", "too-many-steps", "output-type", "latents-shape", "callback-inputs", "negative-guidance", "nan-guidance",
         "interval-reversed", "interval-negative", "interval-nan", "interval-one-value", "interval-string", "unknown-ramp",
         "ramp-negative-weight"],
)
def test_bad_input_is_a_clear_value_error(pipe: ConditionalDiffusionPipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ((-1.0,), r"guidance_scale must be >= 0, got -1\.0"),
        ((math.inf,), r"guidance_scale must be finite, got inf"),
        ((3.0, (5.0, 1.0)), r"guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
        ((3.0, None, "linear"), r"guidance_ramp 'linear' unknown"),
        ((0.2, None, "increasing"), r"guidance_ramp 'increasing' at guidance_scale 0\.2"),
    ],
)
def test_guidance_settings_are_checked_without_a_model(settings: tuple, message: str) -> None:
    """The rule that the pipeline, the config and the command lines share (``pipeline.guidance``, no torch)."""
    check_guidance_settings(3.0, (0.3, math.inf), "increasing")
    with pytest.raises(ValueError, match=message):
        check_guidance_settings(*settings)


def test_guidance_without_a_null_class_is_refused() -> None:
    pipe = make_pipe(tiny_unet(use_null_class=False))
    sample(pipe, guidance_scale=1.0)  # the conditional model alone is fine
    message = r"guidance_scale=2\.0 needs a null class, but this model was trained without one .* p_uncond > 0"
    with pytest.raises(ValueError, match=message):
        sample(pipe, guidance_scale=2.0)
    with pytest.raises(ValueError, match=message):
        pipe.predict_noise(torch.randn(1, 1, 28, 28), torch.tensor(5), torch.tensor([1]), guidance_scale=2.0)


def test_learned_range_scheduler_needs_a_learned_variance_model(pipe: ConditionalDiffusionPipeline) -> None:
    pipe.scheduler = make_train_scheduler(DiffusionConfig(), learned_variance=True)
    with pytest.raises(ValueError, match=r"variance_type='learned_range' needs a model trained with model\.learned_variance=true"):
        sample(pipe)
