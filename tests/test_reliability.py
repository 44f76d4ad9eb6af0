"""A run never silently loses, mixes or corrupts work (docs/reliability.md): each fault reproduced end to end on a
tiny model and real MNIST, with the outcome the user must see. Each test failed on the code before the fix."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.checkpointing import EXIT_DIVERGED, list_checkpoints, write_manifest
from tests.conftest import MNIST, REPO, TINY_MODEL
from tests.test_training import COMMON, ENV, free_port, run_train, train_command

THREE_STEPS = ["--train.max_steps", "3", "--train.checkpoint_every", "3"]


def run_bad(output_dir: Path, *overrides: str, expect: int = 2) -> str:
    """Run the trainer expecting a refusal: that exit status and one line on stderr, no traceback."""
    result = subprocess.run(train_command(output_dir, *overrides), capture_output=True, text=True, cwd=REPO, timeout=300, env=ENV)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line.split("error: ", 1)[1] for line in result.stderr.splitlines() if "error: " in line]  # after a progress bar's \r
    return line


def all_finite(checkpoint: Path) -> bool:
    tensors = {**load_file(checkpoint / "model.safetensors"), **load_file(checkpoint / "ema.safetensors")}
    return all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.slow
def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    line = run_bad(tmp_path, "--train.lr", "1e30", "--train.checkpoint_every", "1", "--train.keep_checkpoints", "2",
                   "--train.max_steps", "6", expect=EXIT_DIVERGED)
    good = tmp_path / "checkpoints" / "step_00000001"
    assert "diverged" in line and "at step 2;" in line and f"last good checkpoint: {good};" in line, line
    assert list_checkpoints(tmp_path) == [good] and all_finite(good)
    assert not (tmp_path / "pipeline").exists(), "a non-finite pipeline was exported"
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "diverged", "step": 2}


@pytest.mark.slow
def test_fresh_start_in_a_used_output_dir_is_refused_and_overwrite_moves_the_old_run_aside(tmp_path: Path) -> None:
    run_train(tmp_path, *THREE_STEPS)
    line = run_bad(tmp_path, "--train.max_steps", "2")
    assert "already holds checkpoints up to step_00000003" in line and "--resume latest" in line and "--train.overwrite" in line
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    log = run_train(tmp_path, "--train.max_steps", "2", "--train.checkpoint_every", "1", "--train.overwrite", "true")
    [moved] = (tmp_path / "abandoned").iterdir()
    assert f"moved to {moved}" in log
    assert (moved / "checkpoints" / "step_00000003" / "manifest.json").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_moves_newer_ones_aside_and_never_prunes_the_new_one(tmp_path: Path) -> None:
    run_train(tmp_path, "--train.max_steps", "6")
    older = tmp_path / "checkpoints" / "step_00000003"
    run_train(tmp_path, "--train.max_steps", "4", "--train.keep_checkpoints", "1", "--resume", str(older))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004"]  # the old code kept only step_6
    [moved] = (tmp_path / "abandoned").iterdir()
    assert (moved / "checkpoints" / "step_00000006" / "manifest.json").exists()


@pytest.mark.slow
def test_a_second_run_on_a_locked_output_dir_is_refused(tmp_path: Path) -> None:
    with open(tmp_path / ".lock", "a+") as lock:  # another job holding the directory
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 1234 on node7\n")
        lock.flush()
        line = run_bad(tmp_path, "--train.max_steps", "1")
    assert f"{tmp_path} is in use by another run (pid 1234 on node7 holds" in line
    assert not (tmp_path / "checkpoints").exists()


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_crafted_pickle_in_a_checkpoint_does_not_run(tmp_path: Path) -> None:
    run_train(tmp_path, *THREE_STEPS)
    [checkpoint] = list_checkpoints(tmp_path)
    assert not list(checkpoint.glob("custom_checkpoint_*")), "custom state is pickled"
    marker = tmp_path / "code-ran"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        (checkpoint / name).write_bytes(pickle.dumps(RunsCode(marker)))
    write_manifest(checkpoint)  # an attacker can rewrite the manifest too: the loader itself must not unpickle
    result = subprocess.run(train_command(tmp_path, "--train.max_steps", "4", "--resume", "latest"), capture_output=True,
                            text=True, cwd=REPO, timeout=300, env=ENV)
    assert not marker.exists(), "the checkpoint ran code"
    assert result.returncode == 2 and "cannot be loaded" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_resume_applies_a_changed_learning_rate_and_keeps_each_start_config(tmp_path: Path) -> None:
    run_train(tmp_path, *THREE_STEPS)
    log = run_train(tmp_path, "--train.max_steps", "5", "--train.lr", "5e-4", "--resume", "latest")
    assert "config change applied: train.lr: 0.001 -> 0.0005" in log
    events = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    events.Reload()
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == lrs[5] == pytest.approx(5e-4)
    starts = sorted(p.name for p in (tmp_path / "configs").iterdir())
    assert starts == ["start-001-step_00000000.yaml", "start-002-step_00000003.yaml"]
    assert "lr: 0.001" in (tmp_path / "configs" / starts[0]).read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [(["--model.base_channels", "8"], "resume refuses a changed model.base_channels 16 -> 8"),
     (["--train.batch_size", "16"], "resume refuses a changed train.batch_size 8 -> 16"),
     (["--diffusion.prediction_type", "v_prediction"], "resume refuses a changed diffusion.prediction_type 'epsilon' -> 'v_prediction'")],
    ids=["architecture", "batch-size", "diffusion"],
)
@pytest.mark.slow
def test_resume_refuses_a_changed_architecture_batch_size_or_objective(tmp_path: Path, change: list[str], message: str) -> None:
    run_train(tmp_path, *THREE_STEPS)
    assert message in run_bad(tmp_path, "--train.max_steps", "4", "--resume", "latest", *change)


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    run_train(tmp_path, "--train.max_steps", "6")
    weights = tmp_path / "checkpoints" / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    log = run_train(tmp_path, "--train.max_steps", "6", "--resume", "latest")
    assert f"warning: skipping checkpoint {weights.parent}: model.safetensors does not match manifest.json" in log
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000003'} at step 3" in log
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]
    assert all_finite(tmp_path / "checkpoints" / "step_00000006")


@pytest.mark.slow
def test_resume_refuses_a_temporary_or_incomplete_directory(tmp_path: Path) -> None:
    run_train(tmp_path, *THREE_STEPS)
    [checkpoint] = list_checkpoints(tmp_path)
    partial = checkpoint.with_name(".tmp-step_00000003")
    checkpoint.rename(partial)
    assert "not a checkpoint directory" in run_bad(tmp_path, "--train.max_steps", "4", "--resume", str(partial))
    partial.rename(checkpoint)
    (checkpoint / "manifest.json").unlink()
    assert "no manifest.json (an incomplete write)" in run_bad(tmp_path, "--train.max_steps", "4", "--resume", str(checkpoint))


def test_labels_outside_the_classes_are_refused_at_load_time(tmp_path: Path) -> None:
    rows = datasets.load_dataset(str(MNIST), split="test").select(range(16))
    unlabelled = rows.map(lambda row, i: {"label": -1 if i == 5 else row["label"]}, with_indices=True)  # ClassLabel's "no label"
    assert unlabelled.features["label"] == rows.features["label"]
    unlabelled.save_to_disk(str(tmp_path / "data"))
    line = run_bad(tmp_path / "run", "--data.dataset", str(tmp_path / "data"), "--train.max_steps", "1")
    assert "1 labels in 'label' are outside 0..9" in line


@pytest.mark.slow
def test_an_unreachable_hub_data_set_is_one_line_naming_the_fixes(tmp_path: Path) -> None:
    """Offline (the tests run with HF_HUB_OFFLINE=1), a hub id that is not cached: one line naming a local path and
    HF_HUB_OFFLINE, exit 2 (the old code let the hub client's ConnectionError through as a traceback)."""
    line = run_bad(tmp_path / "run", "--data.dataset", "someone/no-such-dataset", "--train.max_steps", "1")
    assert "'someone/no-such-dataset' is neither a local path nor a reachable hub data set" in line
    assert "local directory" in line and "HF_HUB_OFFLINE=1" in line


@pytest.mark.slow
def test_train_restores_the_signal_handlers_it_replaced(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.training import train

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    cfg = load_config(None, [*TINY_MODEL, "--data.dataset", str(MNIST), "--data.max_samples", "64", "--train.batch_size", "8",
                             "--train.max_steps", "1", "--train.sample_every", "none", "--train.output_dir", str(tmp_path)])
    assert train(cfg) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("args", [["--config"], ["--resume", "--train.max_steps", "1"]], ids=["config", "resume"])
def test_a_flag_without_its_value_is_bad_input(args: list[str], capsys: pytest.CaptureFixture) -> None:
    from pipeline.train import main

    assert main(args) == 2
    assert f"error: {args[0]} needs a value" in capsys.readouterr().err


def test_a_value_error_at_run_time_is_not_reported_as_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.training
    from pipeline.train import main

    def fails_hours_in(cfg: object, resume: str | None) -> int:
        raise ValueError("a bug deep in the loop")

    monkeypatch.setattr(pipeline.training, "train", fails_hours_in)
    with pytest.raises(ValueError, match="a bug deep in the loop"):
        main(["--train.max_steps", "1"])


def test_the_export_is_flushed_to_disk_before_it_is_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DDPMScheduler

    from pipeline.export import export_pipeline
    from tests.factories import tiny_unet

    synced, fsync = [], os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    export_pipeline(tiny_unet(), DDPMScheduler(), tmp_path)
    assert str(tmp_path / ".tmp-pipeline" / "unet" / "diffusion_pytorch_model.safetensors") in synced
    assert str(tmp_path) in synced  # the rename itself


@pytest.mark.multiprocess
def test_bad_input_on_two_processes_through_node_sh_is_one_line_without_a_launcher_traceback(tmp_path: Path) -> None:
    env = {**ENV, "CPU": "1", "PROCS_PER_NODE": "2", "MAIN_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "NUM_NODES", "NODE_RANK", "MAIN_ADDR"))}
    result = subprocess.run([str(REPO / "launch" / "node.sh"), "--train.output_dir", str(tmp_path), *COMMON,
                             "--train.max_steps", "1", "--train.batch_size", "7"], capture_output=True, text=True, cwd=REPO,
                            timeout=600, env=env)
    assert result.returncode != 0
    assert result.stderr.count("train.batch_size 7 must be divisible by processes x accumulation steps = 2") == 1, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
