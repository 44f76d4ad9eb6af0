"""Shared test fixtures: the real data sets beside the checkout and small model settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
MNIST = SHARED_DATA / "mnist"
CIFAR10 = SHARED_DATA / "cifar10"

# Tests of these kinds are slow by nature: `pytest -m "not slow"` (the development tier) leaves them out.
SLOW_KINDS = ("multiprocess", "slurm", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


# A U-Net small enough for CPU tests: ~0.1 M parameters, two levels.
TINY_MODEL = ["--model.base_channels", "16", "--model.channel_mult", "1,2", "--model.layers_per_block", "1",
              "--model.attention_resolutions", "14", "--model.attention_heads", "2"]


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    assert (MNIST / "train.parquet").exists(), f"real MNIST expected at {MNIST} (see ../shared/data/README.md)"
    return MNIST


@pytest.fixture(scope="session")
def cifar10_path() -> Path:
    assert (CIFAR10 / "train.parquet").exists(), f"real CIFAR-10 expected at {CIFAR10}"
    return CIFAR10


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, mnist_path: Path) -> Path:
    """A tiny U-Net trained for 12 steps on real MNIST: its output directory (pipeline/, tensorboard/, config.yaml)."""
    from pipeline.config import load_config
    from pipeline.training import train

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = load_config(None, [*TINY_MODEL, "--data.dataset", str(mnist_path), "--data.max_samples", "256", "--train.batch_size", "16",
                             "--train.max_steps", "12", "--train.log_every", "2", "--train.sample_every", "none",
                             "--train.output_dir", str(out), "--sample.num_inference_steps", "3"])
    assert train(cfg) == 0
    return out


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    """``tiny_run``'s pipeline distilled for 2 steps by ``python -m pipeline.distill`` (segment, 4 DDIM steps): the
    student run's output directory; its config names the teacher's folder."""
    from pipeline.distill import main as distill_main

    out = tmp_path_factory.mktemp("tiny-student") / "student"
    assert distill_main(["--teacher", str(tiny_run / "pipeline"), "--out", str(out), "--train.max_steps", "2",
                         "--train.batch_size", "8", "--train.sample_every", "none", "--distill.teacher_steps", "8"]) == 0
    return out
