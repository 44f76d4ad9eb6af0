"""The committed pretrained CIFAR-10 pipeline: small, half-precision on disk, float32 when loaded, as good as its
model card says (re-measured on a few hundred fresh samples), and a card that reproduces its numbers: the data set by
its hub id, the licenses, the chunked run's command and launched config, and the exact evaluation that was run."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from pipeline import ConditionalDiffusionPipeline
from pipeline.config import DiffusionConfig, SampleConfig, load_config
from pipeline.diffusion import make_train_scheduler
from pipeline.evaluation.metrics import Evaluator, markdown_table
from pipeline.export import rewrite_card, save_export
from pipeline.model_card import shipped_code
from pipeline.sampling import generate
from tests.conftest import REPO
from tests.factories import tiny_unet

PRETRAINED = REPO / "data" / "pretrained" / "cifar10-cpu"


def test_pretrained_weights_are_small_half_precision_and_load_as_float32() -> None:
    weights = PRETRAINED / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 25 * 10**6  # issue 22's limit for the published weights
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


def card() -> tuple[dict, str]:
    """The committed card: (its YAML front matter as the hub reads it, its Markdown body)."""
    _, front, body = (PRETRAINED / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def test_pretrained_card_names_the_hub_data_set_the_licenses_and_the_chunked_run() -> None:
    metadata, body = card()
    assert metadata["license"] == "apache-2.0" and metadata["datasets"] == ["uoft-cs/cifar10"] and "pipeline_tag" not in metadata
    assert "trained from a local copy at `../shared/data/cifar10`" in body
    assert "The training data, `uoft-cs/cifar10`: no formal license" in body.split("## License")[1]
    # the shipped config is the one the chunks were launched with (configs/cifar10-cpu-long.yaml: 30 minutes), not the
    # 11 minutes of the first start or the 9 of others cut short by a working session's end; the card gives the chunk
    # command that repeats the run with it
    launched = load_config(REPO / "configs" / "cifar10-cpu-long.yaml").train.max_minutes
    assert load_config(PRETRAINED / "config.yaml").train.max_minutes == launched == 30
    assert f"each start stops after `train.max_minutes` ({launched:g} minutes)" in body and "The run took 17 starts." in body
    assert "python pipeline/train.py --config config.yaml\npython pipeline/train.py --config config.yaml --resume latest" in body


def test_pretrained_card_states_n_reference_and_the_evaluation_that_was_run() -> None:
    """The measured table is metrics.json's (FID 26.0, 97.7 %: 5,000 samples against the 10,000 test images), the
    in-training one says its N = 200 against training images, and the card's command is the one docs/cifar10-cpu.md
    records as run, with the settings it took from the run's config spelled out."""
    from pipeline.evaluation.__main__ import _parser

    documented = json.loads((PRETRAINED / "metrics.json").read_text())
    _, body = card()
    in_training, measured = body.split("## Evaluation")[1].split("## Measured")
    assert "N = 200 samples (20 per class; dpmsolver++, 20 steps, guidance scale 3.0, seed 0)" in in_training
    assert "the first 10,000 images of the `train` split" in in_training and "| eval/fid | 111.5 | 28600 |" in in_training
    assert "N = 5,000 samples (500 per class; dpmsolver++, 20 steps, guidance scale 3.0, seed 0)" in measured
    assert "all 10,000 images of the `test` split" in measured
    assert markdown_table(documented["rows"]).strip() in measured and "| model | 5000 | 0.9766 | 3.61 | 21.19 | 25.96 |" in measured

    docs = (REPO / "docs" / "cifar10-cpu.md").read_text().replace("\\\n", " ")
    command = "python -m pipeline.evaluation evaluate --pipeline runs/cifar10-cpu-long/pipeline "
    (ran,) = [line for line in docs.splitlines() if line.startswith(command) and "--ref-split test" in line]  # not the guidance check's
    (shown,) = [line for line in measured.splitlines() if line.startswith("python -m pipeline.evaluation evaluate")]
    ran_args, shown_args = (vars(_parser().parse_args(shlex.split(command)[3:])) for command in (ran, shown))
    resolved = {"dataset": documented["dataset"], **dataclasses.asdict(SampleConfig(**documented["sample"]))}
    for key, value in ran_args.items():
        if key != "out":  # EVAL.json in the docs, the committed JSON on the card
            assert shown_args[key] == (resolved[key] if value is None and key in resolved else value), key


def test_pretrained_card_is_the_one_rewrite_card_writes_now(tmp_path: Path) -> None:
    """After a change to the card's code, run ``python -m pipeline.export --rewrite-card data/pretrained/cifar10-cpu``
    (from the folder's config.yaml, training.json and metrics.json; weights, grid and code stay as they are)."""
    folder = tmp_path / "cifar10-cpu"
    shutil.copytree(PRETRAINED, folder)
    rewrite_card(folder)
    assert (folder / "README.md").read_text() == (PRETRAINED / "README.md").read_text()
    assert (folder / "training.json").read_text() == (PRETRAINED / "training.json").read_text()
