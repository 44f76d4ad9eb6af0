"""The benchmarks run end to end at toy budgets and print well-formed tables (their numbers are in
docs/performance.md; speed is never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.train_throughput import PEERS, Levers, count, matched, measure, ours
from tests.conftest import REPO

BENCH = REPO / "bench"


def run_bench(tmp_path: Path, script: str, *args: str) -> list[list[str]]:
    """Run ``bench/<script>`` (caches under ``tmp_path``) and return the cells of its Markdown table's body rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row] for row in rows[1:]]


@pytest.mark.parametrize("shape", ["mnist", "cifar10"])
@pytest.mark.parametrize("peer", list(PEERS))
def test_peers_are_matched_to_our_parameter_count_within_two_percent(shape: str, peer: str) -> None:
    mine = ours(shape, [])
    assert abs(count(matched(PEERS[peer], mine)) / count(mine) - 1) < 0.02


def test_diffusers_peer_attends_at_our_resolutions() -> None:
    mine = ours("cifar10", [])  # attention at 16 x 16, the second of four levels
    peer = matched(PEERS["diffusers UNet2DModel"], mine)
    assert list(peer.config.down_block_types) == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert list(peer.config.up_block_types) == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]


@pytest.mark.parametrize("levers", [Levers(), Levers(channels_last=True), Levers(fused_adamw=True), Levers(ema_foreach=False),
                                    Levers(sync_every_step=True)])
def test_every_lever_trains(levers: Levers) -> None:
    model = ours("mnist", [])
    before = [p.detach().clone() for p in model.parameters()]
    result = measure(model, "mnist", batch=4, seconds=0.0, bf16=True, device=torch.device("cpu"), levers=levers)
    assert result["images_per_s"] > 0 and result["warmup_s"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # the optimizer stepped


@pytest.mark.slow
def test_training_throughput_table(tmp_path: Path) -> None:
    rows = run_bench(tmp_path, "train_throughput.py", "--shapes", "mnist", "--precisions", "bf16", "--models", "ours,diffusers UNet2DModel",
                     "--batch", "8", "--seconds", "0.2", "--repeats", "1")
    assert [row[2] for row in rows] == ["ours", "diffusers UNet2DModel"]
    assert rows[1][6] == "1.00x" and float(rows[0][5]) > 0 and float(rows[0][4]) > 0  # ratio, images/s, GFLOP/image


@pytest.mark.slow
def test_input_pipeline_table(tmp_path: Path) -> None:
    (row,) = run_bench(tmp_path, "input_pipeline.py", "--datasets", "data/mnist", "--batches", "3", "--model-seconds", "0")
    assert row[0] == "mnist (60000 images)" and all(cell.endswith(("img/s", "x")) for cell in row[2:])


@pytest.mark.slow
def test_sampling_table(tiny_run: Path, tiny_student: Path, tmp_path: Path) -> None:
    """The pipeline's rows, then its distilled student's at its own sampler (issue 26): a guided step of the pipeline
    counts two U-Net evaluations per image, the student's one at any guidance. ``--metrics`` adds a column per distance,
    against the reference ``--ref-split`` / ``--ref-samples`` name."""
    rows = run_bench(tmp_path, "sampling.py", "--pipeline", str(tiny_run / "pipeline"), "--per-class", "2",
                     "--schedules", "ddpm:4,dpmsolver++:2", "--guidance", "1,2", "--batch-size", "10",
                     "--student", str(tiny_student / "pipeline"), "--student-steps", "1,4",
                     "--metrics", "cfid,fid", "--ref-split", "test", "--ref-samples", "30")
    assert all(len(row) == 12 and float(row[10]) > 0 and float(row[11]) > 0 for row in rows)  # classifier-FID, FID
    assert [tuple(row[:5]) for row in rows] == [
        ("pipeline", "ddpm", "4", "4", "1"), ("pipeline", "dpmsolver++", "2", "2", "1"), ("student", "ddim", "1", "1", "1"),
        ("student", "ddim", "4", "4", "1"), ("pipeline", "ddpm", "4", "8", "2"), ("pipeline", "dpmsolver++", "2", "4", "2"),
        ("student", "ddim", "1", "1", "2"), ("student", "ddim", "4", "4", "2")]
    assert rows[0][8] == "1.0x" and all(0 <= float(row[9].split(" %")[0]) <= 100 for row in rows)
    assert all(float(row[7].rstrip("x")) > 0 for row in rows)  # time per image against the model-forward floor


def test_sampling_chunk_sweep_against_the_forward_floor(tiny_run: Path, tmp_path: Path) -> None:
    rows = run_bench(tmp_path, "sampling.py", "--pipeline", str(tiny_run / "pipeline"), "--per-class", "1",
                     "--schedules", "dpmsolver++:2", "--guidance", "2", "--precisions", "no,bf16", "--chunks", "2,5")
    assert [(row[3], row[4]) for row in rows] == [("no", "2"), ("no", "5"), ("bf16", "2"), ("bf16", "5")]
    assert all(float(row[5]) > 0 and float(row[6]) > 0 and row[7].endswith("x") for row in rows)


@pytest.mark.slow
def test_diffusers_recipe_trains_and_is_scored_like_ours(tmp_path: Path, mnist_path: Path) -> None:
    rows = run_bench(tmp_path, "diffusers_recipe.py", "--config", "configs/quickstart-cpu.yaml", "--minutes", "0.15",
                     "--output-dir", str(tmp_path / "peer"), "--per-class", "1", "--data.dataset", str(mnist_path),
                     "--data.max_samples", "256", "--train.batch_size", "8", "--sample.num_inference_steps", "2")
    assert rows[0][0] == "model" and rows[0][1] == "10" and 0 <= float(rows[0][2]) <= 1  # n, accuracy
    summary = json.loads((tmp_path / "peer" / "peer.json").read_text())
    assert summary["steps"] >= 4 and summary["images_seen"] == 8 * summary["steps"]
    assert abs(summary["params"] / summary["ours_params"] - 1) < 0.02  # matched to our U-Net


@pytest.mark.multiprocess
def test_scaling_table(tmp_path: Path) -> None:
    rows = run_bench(tmp_path, "scaling.py", "--steps", "4", "--log-every", "2", *[f"--override={o}" for o in
                     ("--model.base_channels=8", "--data.max_samples=512", "--train.batch_size=16", "--train.warmup_steps=1")])
    assert [row[0] for row in rows] == ["1 process, all cores", "1 process, OMP_NUM_THREADS=1", "2 processes x 1 thread (gloo)"]
    assert rows[0][2] == "1.00x" and all(float(row[1]) > 0 for row in rows)
