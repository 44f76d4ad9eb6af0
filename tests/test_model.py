"""The conditional U-Net (shapes, conditioning, construction errors, save/load) and the training objective."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.config import DataConfig, DiffusionConfig, ModelConfig
from pipeline.data import load_image_data, to_model_range
from pipeline.diffusion import diffusion_loss, make_train_scheduler, model_log_variance, snr, variational_bound
from pipeline.models import unet as unet_module
from pipeline.models.unet import ConditionalUNet
from pipeline.names import CONDITIONING_MODES, conditioning_problem
from tests.factories import CONDITIONINGS, IMAGE_SHAPES, single_threaded, tiny_unet

pytestmark = pytest.mark.usefixtures(single_threaded.__name__)

# --- the U-Net ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learned_variance", [False, True], ids=["mean", "learned_variance"])
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("dataset", IMAGE_SHAPES)
def test_output_shape(dataset: str, conditioning: str, learned_variance: bool) -> None:
    size, channels = IMAGE_SHAPES[dataset]
    unet = tiny_unet(size, channels, conditioning=conditioning, learned_variance=learned_variance)
    labels = torch.tensor([0, 9, unet.null_class])
    out = unet(torch.randn(3, channels, size, size), torch.tensor([0, 500, 999]), labels).sample
    assert out.shape == (3, channels * (1 + learned_variance), size, size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("upsample", ["transposed", "nearest"])
def test_upsampling_variants_keep_the_shape(upsample: str) -> None:
    out = tiny_unet(upsample=upsample)(torch.randn(2, 1, 28, 28), 10, torch.tensor([1, 2]), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 1, 28, 28)


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two outputs differ beyond float rounding (allclose's default 1e-8 + 1e-5 |b| passes rounding noise on
    small outputs as a difference)."""
    return (a - b).abs().max().item() > 1e-3 * a.abs().max().item()


@pytest.mark.parametrize(("conditioning", "embed_after_norm"), [("multiply", True), ("add", True), ("scale_shift", False)])
def test_output_depends_on_label_and_timestep(conditioning: str, embed_after_norm: bool) -> None:
    unet = tiny_unet(conditioning=conditioning, embed_after_norm=embed_after_norm)
    x = torch.randn(1, 1, 28, 28)
    reference = unet(x, 10, torch.tensor([3])).sample
    assert _changed(reference, unet(x, 10, torch.tensor([4])).sample)
    assert _changed(reference, unet(x, 10, torch.tensor([unet.null_class])).sample)
    assert _changed(reference, unet(x, 500, torch.tensor([3])).sample)


@pytest.mark.parametrize("conditioning", ["multiply", "add"])
def test_mixing_before_a_one_channel_group_norm_erases_the_timestep(conditioning: str) -> None:
    """The seed's placement (before the second GroupNorm), at 8 and 16 channels (one per group): the norm removes
    each channel's mean and scale, so t (a per-channel shift) never reaches the output, nor does c when it is one
    too (add); c*h keeps only c's sign. docs/study.md measures what this costs."""
    unet = tiny_unet(conditioning=conditioning)
    x = torch.randn(1, 1, 28, 28)
    reference = unet(x, 10, torch.tensor([3])).sample
    assert not _changed(reference, unet(x, 500, torch.tensor([3])).sample)
    assert _changed(reference, unet(x, 10, torch.tensor([4])).sample) == (conditioning == "multiply")


def test_timestep_may_be_int_float_scalar_or_batch() -> None:
    unet = tiny_unet()
    x, labels = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    reference = unet(x, torch.tensor([7, 7]), labels).sample
    for timestep in (7, 7.0, torch.tensor(7), torch.tensor([7])):
        torch.testing.assert_close(unet(x, timestep, labels).sample, reference)


def test_null_class_only_with_label_dropout() -> None:
    assert tiny_unet().null_class == 10
    assert tiny_unet(use_null_class=False).null_class is None


def test_odd_base_channels_work() -> None:
    unet = tiny_unet(base_channels=5, attention_resolutions=(), attention_heads=1)
    assert unet(torch.randn(1, 1, 28, 28), 3, torch.tensor([0])).sample.shape == (1, 1, 28, 28)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"channel_mult": (1, 2, 2, 2)}, r"sample_size 28 cannot be halved 3 times .* divisible by 8 or fewer levels"),
        ({"sample_size": 30, "channel_mult": (1, 2, 2)}, r"sample_size 30 cannot be halved 2 times"),
        ({"attention_resolutions": (7,)}, r"attention_resolutions \[7\] are not feature-map sizes .* choose from \[28, 14\]"),
        ({"attention_heads": 3}, r"16 channels do not split into 3 heads; change model.attention_heads"),
        ({"class_names": ["zero", "one"]}, r"2 class_names given for num_classes=10"),
        ({"conditioning": "concat"}, r"conditioning 'concat' unknown; use multiply, add or scale_shift"),
        ({"upsample": "bilinear"}, r"upsample 'bilinear' unknown; use transposed or nearest"),
        ({"conditioning": "scale_shift", "embed_after_norm": True}, r"embed_after_norm applies to multiply and add"),
    ],
    ids=["size-3-levels", "size-2-levels", "attention-resolution", "heads", "class-names", "conditioning", "upsample",
         "after-norm-scale-shift"],
)
def test_bad_construction_is_a_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_unet(**overrides)


def test_unet_conditioning_modes_are_the_configs() -> None:
    """The U-Net's file ships alone in exports, so it keeps its own copy of the names the config offers."""
    assert unet_module.CONDITIONING_MODES == CONDITIONING_MODES


@pytest.mark.parametrize(("conditioning", "embed_after_norm"), itertools.product((*CONDITIONING_MODES, "concat"), (False, True)))
def test_unet_refuses_exactly_what_the_config_refuses(conditioning: str, embed_after_norm: bool) -> None:
    """model.conditioning x model.embed_after_norm: the config refuses at start (pipeline.names.conditioning_problem)
    exactly the pairs the U-Net cannot be built with."""
    refused_by_config = conditioning_problem(conditioning, embed_after_norm) is not None
    try:
        tiny_unet(conditioning=conditioning, embed_after_norm=embed_after_norm)
    except ValueError:
        refused_by_unet = True
    else:
        refused_by_unet = False
    assert refused_by_unet == refused_by_config


def test_input_size_the_levels_cannot_divide_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"input size \(27, 27\) must be divisible by 2"):
        tiny_unet()(torch.randn(1, 1, 27, 27), 0, torch.tensor([0]))


def test_model_config_defaults_are_the_unets() -> None:
    """The shipped U-Net file is self-contained (plain diffusers loads it), so it keeps its own defaults; a config's
    model section builds it whole (``build_unet``), and its defaults must be the same model."""
    unet_defaults = {name: p.default for name, p in inspect.signature(ConditionalUNet.__init__).parameters.items()}
    for name, value in dataclasses.asdict(ModelConfig()).items():
        assert unet_defaults[name] == value, name


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    unet = tiny_unet(32, 3, class_names=names, conditioning="scale_shift", learned_variance=True)
    unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ConditionalUNet.from_pretrained(tmp_path)
    assert loaded.config.class_names == names and loaded.config.conditioning == "scale_shift"
    assert loaded.state_dict().keys() == unet.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in unet.state_dict().items())
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 10])
    assert torch.equal(loaded(x, 300, labels).sample, unet(x, 300, labels).sample)


# --- the training objective ---------------------------------------------------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor]
OBJECTIVES = {
    "seed": DiffusionConfig(),
    "cosine-v": DiffusionConfig(schedule="cosine", prediction_type="v_prediction"),
    "min-snr-eps": DiffusionConfig(loss_weighting="min_snr"),
    "min-snr-v": DiffusionConfig(prediction_type="v_prediction", loss_weighting="min_snr"),
}


@pytest.fixture(scope="module")
def mnist_batch(mnist_path: Path) -> Batch:
    """16 real MNIST digits in [-1, 1] and their labels."""
    data = load_image_data(DataConfig(dataset=str(mnist_path), max_samples=256))
    return to_model_range(data.images[:16]), data.labels[:16]


def noised(
    clean: torch.Tensor, cfg: DiffusionConfig, learned_variance: bool = False, timesteps: torch.Tensor | None = None
) -> tuple[DDPMScheduler, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scheduler, noise, timesteps, x_t) for ``clean`` at ``timesteps`` (default: random ones)."""
    scheduler = make_train_scheduler(cfg, learned_variance)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=generator)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator)
    return scheduler, noise, timesteps, scheduler.add_noise(clean, noise, timesteps)


@pytest.mark.parametrize("learned_variance", [False, True], ids=["mean", "hybrid-loss"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_one_training_step_on_real_mnist_lowers_the_loss(mnist_batch: Batch, objective: str, learned_variance: bool) -> None:
    clean, labels = mnist_batch
    cfg = OBJECTIVES[objective]
    unet = tiny_unet(randomize=False, learned_variance=learned_variance).train()
    scheduler, noise, timesteps, noisy = noised(clean, cfg, learned_variance)

    def loss() -> torch.Tensor:
        return diffusion_loss(unet(noisy, timesteps, labels).sample, clean, noise, noisy, timesteps, scheduler, cfg)

    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert torch.isfinite(before) and after < before


def test_loss_is_float32_and_close_under_bf16_autocast(mnist_batch: Batch) -> None:
    clean, labels = mnist_batch
    cfg = DiffusionConfig()
    unet = tiny_unet()
    scheduler, noise, timesteps, noisy = noised(clean, cfg)
    full = diffusion_loss(unet(noisy, timesteps, labels).sample, clean, noise, noisy, timesteps, scheduler, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = unet(noisy, timesteps, labels).sample
    assert output.dtype == torch.bfloat16
    mixed = diffusion_loss(output, clean, noise, noisy, timesteps, scheduler, cfg)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=0.05, atol=0.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_exact_prediction_has_zero_loss_and_min_snr_weights(mnist_batch: Batch, prediction_type: str) -> None:
    clean, _ = mnist_batch
    cfg = DiffusionConfig(prediction_type=prediction_type, loss_weighting="min_snr", snr_gamma=5.0)
    scheduler, noise, timesteps, noisy = noised(clean, cfg)
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
    assert diffusion_loss(target, clean, noise, noisy, timesteps, scheduler, cfg) < 1e-10
    # an error of 1 everywhere: the loss is the mean weight, min(SNR, gamma) / SNR or / (SNR + 1)
    ratio = snr(scheduler, timesteps)
    weight = ratio.clamp(max=5.0) / (ratio if prediction_type == "epsilon" else ratio + 1)
    torch.testing.assert_close(diffusion_loss(target + 1, clean, noise, noisy, timesteps, scheduler, cfg), weight.mean())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learned_variance_matches_the_ddpm_scheduler_learned_range(schedule: str) -> None:
    """The hybrid loss trains the variance channels in the convention DDPMScheduler samples them with."""
    scheduler = make_train_scheduler(DiffusionConfig(schedule=schedule), learned_variance=True)
    variance = torch.linspace(-1, 1, 5).view(5, 1, 1, 1)
    for t in (1, 10, 500, 999):
        ours = model_log_variance(variance, torch.full((5,), t), scheduler)
        theirs = torch.stack([scheduler._get_variance(t, predicted_variance=v) for v in variance])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_variational_bound_at_t0_trains_the_variance(mnist_batch: Batch) -> None:
    """Improved DDPM's decoder term: finite and with a gradient for the variance (not log(1e-20))."""
    clean, cfg = mnist_batch[0][:4], DiffusionConfig()
    scheduler, noise, timesteps, noisy = noised(clean, cfg, learned_variance=True, timesteps=torch.zeros(4, dtype=torch.long))
    prediction = noise + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    variance = torch.zeros_like(clean, requires_grad=True)
    bound = variational_bound(prediction, variance, clean, noisy, timesteps, scheduler, cfg)
    bound.sum().backward()
    assert torch.isfinite(bound).all() and 0 < bound.mean() < 10
    assert variance.grad.abs().sum() > 0


def test_variational_bound_vanishes_for_the_true_posterior(mnist_batch: Batch) -> None:
    """KL(q || p) = 0 when the model's mean is the posterior's (exact epsilon) and its variance too (-1)."""
    clean, cfg = mnist_batch[0][:4], DiffusionConfig(schedule="cosine")
    scheduler, noise, timesteps, noisy = noised(clean, cfg, learned_variance=True, timesteps=torch.tensor([1, 10, 500, 999]))
    bound = variational_bound(noise, -torch.ones_like(clean), clean, noisy, timesteps, scheduler, cfg)
    torch.testing.assert_close(bound, torch.zeros(4), atol=1e-3, rtol=0)
