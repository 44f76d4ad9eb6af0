"""The committed pretrained CIFAR-10 pipeline: small, half-precision on disk, float32 when loaded, and as good
as its model card says (re-measured on a few hundred fresh samples)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline import ConditionalDiffusionPipeline
from pipeline.config import DiffusionConfig, SampleConfig
from pipeline.diffusion import make_train_scheduler
from pipeline.evaluation.metrics import Evaluator
from pipeline.export import save_export
from pipeline.model_card import shipped_code
from pipeline.sampling import generate
from tests.conftest import REPO
from tests.factories import tiny_unet

PRETRAINED = REPO / "data" / "pretrained" / "cifar10-cpu"


def test_pretrained_weights_are_small_half_precision_and_load_as_float32() -> None:
    weights = PRETRAINED / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 12 * 2**20
    with safe_open(str(weights), "pt") as stored:
        assert {stored.get_slice(name).get_dtype() for name in stored.keys()} == {"F16"}
    pipe = ConditionalDiffusionPipeline.from_pretrained(PRETRAINED)
    assert pipe.unet.dtype == torch.float32 and pipe.class_names[3] == "cat" and pipe.class_names[8] == "ship"
    card = (PRETRAINED / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "samples.png" in card


@pytest.mark.slow
def test_pretrained_pipeline_reaches_its_documented_accuracy(cifar10_path: Path) -> None:
    documented = json.loads((PRETRAINED / "metrics.json").read_text())
    model_row = next(row for row in documented["rows"] if row["name"] == "model")
    expected = model_row["accuracy"]
    pipe = ConditionalDiffusionPipeline.from_pretrained(PRETRAINED)
    pipe.set_progress_bar_config(disable=True)
    sample = SampleConfig(**documented["sample"])
    per_class = 20  # 200 fresh samples (another seed than the documented ones), about a minute on 2 CPU cores
    samples = generate(pipe, per_class, sample, seed=12345)
    measured = Evaluator(str(cifar10_path), metrics=("accuracy",)).score(samples)["accuracy"]
    # the binomial standard errors of both measurements, combined; 3 of them is a 0.3 % false-alarm rate
    error = math.sqrt(expected * (1 - expected) / len(samples) + expected * (1 - expected) / model_row["n"])
    assert abs(measured - expected) <= 3 * error, (measured, expected, error)


def test_pretrained_pipeline_ships_the_code_an_export_writes_now(tmp_path: Path) -> None:
    """The committed folder's code is this checkout's: after a change to a shipped module, run
    ``python -m pipeline.export --update-code data/pretrained/cifar10-cpu`` (weights and card stay as they are)."""
    save_export(ConditionalDiffusionPipeline(unet=tiny_unet(), scheduler=make_train_scheduler(DiffusionConfig())), tmp_path)
    committed = {name: (PRETRAINED / name).read_bytes() for name in shipped_code(PRETRAINED)}
    assert set(committed) == set(shipped_code(tmp_path))
    for name in shipped_code(tmp_path):
        assert committed[name] == (tmp_path / name).read_bytes(), f"{name} differs from what pipeline.export writes now"
