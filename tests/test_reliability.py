"""A run never silently loses, mixes or corrupts work (docs/reliability.md): each fault reproduced end to end on a
tiny model and real MNIST, with the outcome the user must see. Each test failed on the code before the fix."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import re
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


# ---- issue 24, round two (r24a): run directories, exports, checkpoints, clocks ----------------------------------------

R24A_RUN = [*TINY_MODEL, "--data.dataset", str(MNIST), "--data.max_samples", "64", "--train.batch_size", "8",
            "--train.sample_every", "none", "--sample.num_inference_steps", "1", "--sample.guidance_scale", "1"]  # a fast card grid


def r24a_args(output_dir: Path, *overrides: str) -> list[str]:
    """``train.py`` arguments for a tiny in-process run in ``output_dir``."""
    return [*R24A_RUN, "--train.output_dir", str(output_dir), *overrides]


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines of a captured stderr (after a progress bar's carriage returns)."""
    return [line.split("error: ", 1)[1] for line in err.splitlines() if "error: " in line]


def test_a_pipeline_directory_that_is_not_an_export_is_refused_before_any_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``output_dir/pipeline`` holding the user's code, no checkpoints: exit 2 at the start, one line naming it and the
    fix, the code kept, nothing trained (the old code trained and then replaced pipeline/ with its export, exit 0)."""
    from pipeline.train import main

    mine = tmp_path / "pipeline" / "my_code.py"
    mine.parent.mkdir()
    mine.write_text("print('mine')\n")
    assert main(r24a_args(tmp_path, "--train.max_steps", "1")) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"{tmp_path / 'pipeline'} exists and is not an export (no model_index.json)"), line
    assert "pick another train.output_dir" in line
    assert mine.read_text() == "print('mine')\n" and [p.name for p in mine.parent.iterdir()] == ["my_code.py"]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tensorboard").exists()


class Killed(BaseException):
    """Stands for SIGKILL in the middle of the final export."""


def test_a_resume_after_a_kill_during_the_final_export_exports_the_final_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while exporting the last step: ``--resume latest`` at the budget writes that step's export (the old code
    said ``finished`` and left pipeline/ at step 2 of 3), and when pipeline/ is missing too; a resume that finds the
    final export in place leaves it alone."""
    import shutil

    import pipeline.export
    from pipeline.config import load_config
    from pipeline.training import train

    save_export = pipeline.export.save_export

    def killed_at_step_3(pipe: object, directory: Path, record: object = None) -> None:
        if record is not None and record.step == 3:
            raise Killed
        save_export(pipe, directory, record)

    cfg = load_config(None, r24a_args(tmp_path, "--train.max_steps", "3", "--train.checkpoint_every", "1",
                                      "--train.export_every", "2"))
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.export, "save_export", killed_at_step_3)
        with pytest.raises(Killed):
            train(cfg)
    card = tmp_path / "pipeline" / "README.md"
    assert "- Steps: 2 optimizer steps" in card.read_text() and list_checkpoints(tmp_path)[-1].name == "step_00000003"
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "running"

    assert train(cfg, "latest") == 0
    assert "- Steps: 3 optimizer steps" in card.read_text()
    assert json.loads((tmp_path / "pipeline" / "training.json").read_text()) == {"step": 3, "images_seen": 24}
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "finished", "step": 3}
    weights = tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert train(cfg, "latest") == 0 and weights.stat().st_mtime_ns == written  # current: not exported again
    shutil.rmtree(tmp_path / "pipeline")  # killed between the swap's two renames
    assert train(cfg, "latest") == 0 and "- Steps: 3 optimizer steps" in card.read_text()


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """ENOSPC inside save_checkpoint (here from the EMA file's write, after save_state wrote the rest): exit 1, one line
    naming the disk and the last good checkpoint, the partial ``.tmp-step_N`` removed; after that ``--resume latest``
    finishes (the old code raised the OSError with its traceback and left the partial directory). Any other error in
    the write keeps its traceback, and its partial directory goes too."""
    import errno
    from collections.abc import Callable

    import pipeline.checkpointing
    from pipeline.train import main

    save_file = pipeline.checkpointing.save_file

    def fails_at_step_4(error: Exception) -> Callable[[dict, Path], None]:
        def write(tensors: dict, path: Path) -> None:
            if "step_00000004" in str(path):
                Path(path).write_bytes(b"\0" * 100)  # the part that fitted
                raise error
            save_file(tensors, path)
        return write

    args = r24a_args(tmp_path / "full", "--train.max_steps", "4", "--train.checkpoint_every", "2")
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.checkpointing, "save_file", fails_at_step_4(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
        assert main(args) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err
    assert line.startswith(f"the disk holding {tmp_path / 'full'} is full (or over quota;"), line
    assert "checkpoint step_00000004 could not be written (OSError: [Errno 28] No space left on device)" in line
    assert f"last good checkpoint: {tmp_path / 'full' / 'checkpoints' / 'step_00000002'};" in line and "--resume latest" in line
    assert [p.name for p in (tmp_path / "full" / "checkpoints").iterdir()] == ["step_00000002"]  # no .tmp-step_00000004
    assert main([*args, "--resume", "latest"]) == 0
    assert json.loads((tmp_path / "full" / "status.json").read_text()) == {"status": "finished", "step": 4}

    args = r24a_args(tmp_path / "bug", "--train.max_steps", "4", "--train.checkpoint_every", "2")
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="a bug in the writer"):
        patch.setattr(pipeline.checkpointing, "save_file", fails_at_step_4(RuntimeError("a bug in the writer")))
        main(args)
    assert [p.name for p in (tmp_path / "bug" / "checkpoints").iterdir()] == ["step_00000002"]


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full")
def test_the_disk_full_error_of_torch_is_recognised() -> None:
    """What torch.save (which save_state uses for the optimizer, LR schedule and RNG states) raises on a full disk is
    recognised: a RuntimeError ``unexpected pos`` without the OSError. /dev/full fails every write with ENOSPC. (Not
    safetensors' save_file: it writes a temporary file and renames it over the target, which would replace /dev/full
    when run as root.) An unrelated error is not recognised."""
    from pipeline.checkpointing import is_disk_full

    with pytest.raises(RuntimeError) as caught:
        torch.save(torch.zeros(1 << 20), "/dev/full")
    assert is_disk_full(caught.value), repr(caught.value)
    assert not is_disk_full(RuntimeError("size mismatch for conv.weight"))


def test_a_wall_clock_jump_does_not_end_the_run_at_max_minutes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``time.time()`` jumps six hours forward after the first step (NTP, say): a run with ``max_minutes`` 60 trains
    to its step budget (the old code measured wall time and stopped at step 1, exit 75)."""
    import time

    import pipeline.training.loop
    from pipeline.config import load_config
    from pipeline.training import train

    wall, train_step, stepped = time.time, pipeline.training.loop.train_step, []

    def first_step_then_jump(*args: object) -> torch.Tensor:
        stepped.append(True)
        return train_step(*args)

    monkeypatch.setattr(pipeline.training.loop, "train_step", first_step_then_jump)
    monkeypatch.setattr(time, "time", lambda: wall() + (6 * 3600 if stepped else 0))
    cfg = load_config(None, r24a_args(tmp_path, "--train.max_steps", "3", "--train.log_every", "1", "--train.max_minutes", "60"))
    assert train(cfg) == 0
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "finished", "step": 3}


# ---- issue 24, round two (r24c): data decoding and labels, the evaluate and study command lines -----------------------


def r24c_labelled(path: Path, labels: list, feature: datasets.features.features.FeatureType) -> Path:
    """A ``save_to_disk`` data set of real MNIST digits with ``labels`` (an empty list: no rows)."""
    digits = datasets.load_dataset(str(MNIST), split="test").select(range(len(labels)))
    features = datasets.Features({"image": datasets.Image(), "label": feature})
    datasets.Dataset.from_dict({"image": digits["image"], "label": labels}, features=features).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    ("labels", "feature", "message"),
    [
        ([0, 1, 2, 999_999, 4, 5, 6, 7], datasets.Value("int64"), "label 999999 at row 3 (0-based) of 'label' would make 1000000 classes"),
        ([0, 1, None, 3], datasets.ClassLabel(num_classes=10), "1 rows of 'label' have no label (None), the first at row 2 (0-based)"),
        ([], datasets.ClassLabel(num_classes=10), "split 'train' has no rows; point data.dataset at a data set with images"),
    ],
    ids=["stray-label", "none-label", "empty"],
)
def test_a_stray_or_missing_label_or_an_empty_data_set_is_one_line_exit_2(tmp_path: Path, labels: list, feature: object,
                                                                          message: str, capsys: pytest.CaptureFixture) -> None:
    """The trainer's command line on such data: exit 2 and one line naming the label and its row (the old code trained
    a million-class model, or ended in a traceback, exit 1), nothing trained."""
    from pipeline.train import main

    data = r24c_labelled(tmp_path / "data", labels, feature)
    run = tmp_path / "run"
    assert main([*TINY_MODEL, "--data.dataset", str(data), "--train.batch_size", "4", "--train.max_steps", "1",
                 "--train.sample_every", "none", "--train.output_dir", str(run)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert message in line, line
    assert not list_checkpoints(run)


def r24c_cli(command: str, argv: list[str]) -> int:
    """``python -m pipeline.evaluation`` (``command`` evaluate) or ``python -m pipeline.study`` (``command`` study)."""
    if command == "study":
        from pipeline.study.__main__ import main as study_main

        return study_main(argv)
    from pipeline.evaluation.__main__ import main as evaluation_main

    return evaluation_main(["evaluate", *argv])


@pytest.mark.parametrize(
    ("command", "patched", "error"),
    [
        ("evaluate", "pipeline.sampling.saved_run_config", ValueError("a bug deep in evaluation")),
        ("study", "pipeline.study.runner.run_study", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
        ("study", "pipeline.study.runner.run_study", RuntimeError("a bug deep in the study")),
    ],
    ids=["evaluate-value-error", "study-cuda-oom", "study-runtime-error"],
)
def test_evaluate_and_study_keep_the_traceback_of_an_error_at_run_time(command: str, patched: str, error: Exception, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError or RuntimeError (CUDA out of memory included) raised at run time is a crash with its traceback, exit
    1, not "bad input" (the old code printed it as one line and exited 2)."""
    def fails(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(patched, fails)
    argv = ["--dataset", "data/mnist"] if command == "evaluate" else ["--set", "mnist", "--out", str(tmp_path), "--runs-dir", str(tmp_path)]
    with pytest.raises(type(error), match=str(error).split(".")[0]):
        r24c_cli(command, argv)


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("evaluate", ["--pipeline", "{tmp}/absent"], "--pipeline: no such folder: {tmp}/absent; pass a training run's pipeline/"),
        ("evaluate", ["--pipeline", "{tmp}"], "--pipeline {tmp} is not an exported pipeline (no model_index.json)"),
        ("evaluate", ["--dataset", "data/mnist", "--ref-samples", "some"], "--ref-samples must be a row count >= 1 or 'all', got 'some'"),
        ("evaluate", ["--dataset", "data/mnist", "--metrics", "accuracy,bogus"], "unknown metric(s) bogus; choose from"),
        ("evaluate", ["--pipeline", "data/pretrained/cifar10-cpu", "--classifier", "mnist", "--metrics", "accuracy"],
         "the pipeline's classes ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'] "
         "differ from the classifier's ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']"),
        ("study", ["--set", "mnist", "--seeds", "0,x"], "--seeds must be distinct integers >= 0 separated by commas"),
        ("study", ["--set", "mnist", "--per-class", "0", "--runs", "nope"], "--per-class must be >= 1, got 0"),
        ("study", ["--set", "mnist", "--budget-steps", "0", "--runs", "nope"], "--budget-steps must be >= 1, got 0"),
    ],
    ids=["absent-pipeline", "not-an-export", "ref-samples", "metric", "class-mismatch", "seeds", "per-class-0", "budget-0"],
)
def test_evaluate_and_study_refuse_bad_input_in_one_line(command: str, argv: list[str], message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad flags stay one line, exit 2, now that only ``ConfigError`` is caught (the old code took 0 for "the set's
    value", and printed int()'s or the hub client's message)."""
    monkeypatch.chdir(REPO)  # data/pretrained/cifar10-cpu
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    if command == "study":
        argv += ["--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    assert r24c_cli(command, argv) == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert message.replace("{tmp}", str(tmp_path)) in line and "Traceback" not in err, err


# ---- issue 25: messages that say where things are, and a refused start that leaves nothing behind -----------------


@pytest.mark.parametrize("command", [["-m", "pipeline.evaluation", "evaluate"], ["-m", "pipeline.figures", "grid", "--out", "g.png"],
                                     ["-m", "pipeline.demo"]], ids=["evaluate", "figures", "demo"])
def test_every_pipeline_flag_says_no_such_folder_in_one_line(command: list[str], tmp_path: Path) -> None:
    """``--pipeline /nonexistent``: one line naming the folder and the fix, exit 2, through the one shared check
    (the old code printed huggingface_hub's "Repo id must use alphanumeric chars", figures with its traceback)."""
    missing = tmp_path / "nonexistent"
    result = subprocess.run([sys.executable, *command, "--pipeline", str(missing)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600, env=ENV)  # the evaluation package imports torch and its metrics first
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result.stderr) == [f"--pipeline: no such folder: {missing}; pass a training run's pipeline/ folder (e.g. "
                                          "runs/quickstart/pipeline) or a hub id owner/name"], result.stderr[-3000:]
    assert "Repo id" not in result.stderr and "Traceback" not in result.stderr


def test_a_pipeline_flag_is_a_folder_unless_it_reads_as_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What tells a path from a hub id ``owner/name``: absolute, ``./``, ``../``, ``~``, a bare name, two or more ``/``
    or a local folder as the owner make a path, which must exist; a run's folder points at its pipeline/."""
    from pipeline.errors import ConfigError
    from pipeline.sample_flags import pipeline_location

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quickstart" / "pipeline").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "pipeline" / "model_index.json").write_text("{}")
    assert pipeline_location("someone/cifar10-ddpm") == "someone/cifar10-ddpm"  # a hub id: from_pretrained fetches it
    assert pipeline_location("runs/quickstart/pipeline") == "runs/quickstart/pipeline"
    for path in ("/nonexistent", "./absent", "../absent", "~/absent", "absent", "runs/absent", "a/b/c", "a b/c"):
        with pytest.raises(ConfigError, match=f"^--pipeline: no such folder: {re.escape(path)}; "):
            pipeline_location(path)
    with pytest.raises(ConfigError, match=r"^--pipeline runs/quickstart is not an exported pipeline \(no model_index.json\); "
                                          r"did you mean runs/quickstart/pipeline\?$"):
        pipeline_location("runs/quickstart")


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) -> its bytes (None for a folder)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in sorted(folder.rglob("*"))}


def test_a_refused_start_in_a_new_output_dir_leaves_nothing(tmp_path: Path) -> None:
    """``--data.dataset /nonexistent`` into a directory that does not exist yet: exit 2, one line, and neither the
    directory nor the parents the start made remain (the old code left them with ``.lock`` and ``status.json``
    ``starting``)."""
    line = run_bad(tmp_path / "new" / "run", "--data.dataset", str(tmp_path / "nonexistent"), "--train.max_steps", "1")
    assert "is neither a local path nor a reachable hub data set" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_refused_start_in_a_used_output_dir_changes_nothing(tmp_path: Path) -> None:
    """A finished run's directory (its ``.lock`` and ``status.json`` included) is byte for byte as it was after a start
    refused for a missing data set, also with ``--train.overwrite true`` (the old code moved the run to abandoned/
    first), or for its checkpoints; a concurrent run is still refused by the lock."""
    run_train(tmp_path, *THREE_STEPS)
    before = tree(tmp_path)
    assert json.loads(before["status.json"]) == {"status": "finished", "step": 3} and ".lock" in before
    run_bad(tmp_path, "--data.dataset", str(tmp_path / "nonexistent"), "--train.max_steps", "4")
    assert tree(tmp_path) == before
    run_bad(tmp_path, "--data.dataset", str(tmp_path / "nonexistent"), "--train.max_steps", "4", "--train.overwrite", "true")
    assert tree(tmp_path) == before
    assert "already holds checkpoints" in run_bad(tmp_path, "--train.max_steps", "4")
    assert tree(tmp_path) == before


def test_undoing_a_start_puts_back_the_lock_and_status_and_keeps_the_lock_working(tmp_path: Path) -> None:
    """``RunLock.undo`` restores what taking the lock changed; while held, a second start is refused; after an undo
    that removed ``.lock``, a new start takes a fresh one."""
    from pipeline.errors import ConfigError
    from pipeline.run_dir import RunLock, write_status

    used = tmp_path / "used"
    used.mkdir()
    (used / ".lock").write_text("pid 1 on old-host\n")
    (used / "status.json").write_text('{"status": "stopped_early", "step": 5}\n')
    before = tree(used)
    lock = RunLock(used)
    write_status(used, "starting")
    with pytest.raises(ConfigError, match="is in use by another run"):
        RunLock(used)
    lock.undo()
    assert tree(used) == before
    fresh = tmp_path / "a" / "b"
    lock = RunLock(fresh)
    write_status(fresh, "starting")
    lock.undo()
    assert list(tmp_path.iterdir()) == [used]
    again = RunLock(fresh)
    with pytest.raises(ConfigError, match="is in use by another run"):
        RunLock(fresh)
    again.release()


@pytest.mark.slow
def test_the_log_ends_saying_where_things_are_and_how_to_continue(tmp_path: Path) -> None:
    """The last lines name the sample grid, the pipeline, the TensorBoard command and how to sample; stopped by
    ``max_minutes`` (exit 75) they also give the command that continues, which does (the old log ended on a bar)."""
    log = run_train(tmp_path, "--train.max_steps", "2", "--train.sample_every", "2")
    grid, pipeline = tmp_path / "samples" / "step_00000002.png", tmp_path / "pipeline"
    assert grid.is_file() and (pipeline / "model_index.json").is_file()
    tail = log.split("finished at step 2\n", 1)[1]
    assert f"sample grid:   {grid}\n" in tail and f"pipeline:      {pipeline}\n" in tail
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}\n" in tail
    assert f"python -m pipeline.figures grid --pipeline {pipeline} --out grid.png" in tail
    assert f"ConditionalDiffusionPipeline.from_pretrained('{pipeline}')" in tail and "continue:" not in tail

    stopped = tmp_path / "stopped"
    log = run_train(stopped, "--train.max_steps", "50", "--train.max_minutes", "0.0001", expect=75)
    [command] = [line.split("e.g. ", 1)[1] for line in log.splitlines() if line.strip().startswith("continue:")]
    assert command == f"python pipeline/train.py --config {stopped / 'config.yaml'} --resume latest"
    resumed = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True, cwd=REPO, timeout=300, env=ENV)
    assert resumed.returncode == 75 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
