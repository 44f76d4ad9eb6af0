"""Crash-safe, verifiable checkpoints and clean stops.

A checkpoint is ``accelerator.save_state`` (model as safetensors; optimizer, LR schedule and RNG states, which
accelerate loads with ``weights_only=True``) plus the EMA weights (safetensors), the loop's own state (``Progress``)
and the resolved config (JSON, YAML; ``save_loop_state``, read back by ``load_checkpoint``), written into
``checkpoints/.tmp-step_N``, flushed to disk and renamed to ``checkpoints/step_N`` once every process has finished
(``pipeline.atomic``). Nothing is registered with ``register_for_checkpointing``, whose pickles accelerate loads
with ``weights_only=False``: a checkpoint directory cannot run code. ``manifest.json`` (every file's size and
SHA-256) is written last, so a directory without a valid one is incomplete or corrupt, and ``latest`` falls back
past it. Checkpoints from before manifests (and pickle-free EMA and loop state) cannot be resumed, and nothing
converts them: without a manifest they cannot be told from an unfinished write, and their pickles would have to be
loaded with ``weights_only=False``. A write that fails leaves no partial directory behind, and a full disk is
reported as such (``DiskFullError``: which disk, the last good checkpoint) rather than as the writer's own error.
``StopSignal`` turns SIGUSR1/SIGTERM (SLURM's pre-timeout signal, preemption, Spot VM shutdown) into a flag that the
training loop checks with its other cross-rank checks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from pipeline.atomic import TMP_PREFIX, build_dir, replace_dir, start_build
from pipeline.errors import ConfigError

if TYPE_CHECKING:  # for annotations only: listing checkpoints (run_dir, export) need not load diffusers' training utils
    from diffusers.training_utils import EMAModel

    from pipeline.config import Config

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
EXIT_DIVERGED = 3  # the loss or gradient norm stopped being finite; the last good checkpoint is kept
EXIT_STOPPED_EARLY = 75  # EX_TEMPFAIL: stopped with a checkpoint; resume to continue
EXIT_DISK_FULL = 1  # a checkpoint did not fit: no requeue (a resume would meet the same full disk), a person frees space
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How torch's and safetensors' writers report a full disk: as RuntimeError or their own error, without the OSError.
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "file write failed", "unexpected pos")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories by name, oldest first (temporary directories of unfinished writes are not listed)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)), key=checkpoint_step)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """``manifest.json``: the size and SHA-256 of every other file in ``directory``. Written last."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def manifest_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete, intact checkpoint, or None if its manifest matches every file."""
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete write)"
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    if present != set(listed):
        return f"its files differ from {MANIFEST} ({', '.join(sorted(present ^ set(listed)))})"
    for name, entry in listed.items():
        path = directory / name
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            return f"{name} does not match {MANIFEST} (corrupt)"
    return None


def resolve_resume(output_dir: Path, resume: str | None, warn: Callable[[str], None]) -> Path | None:
    """``latest`` -> the newest checkpoint with a valid manifest, warning about each newer one skipped (None if
    the run has no checkpoint yet); a path -> that checkpoint, refused unless complete and intact."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        for candidate in reversed(found):
            if (problem := manifest_problem(candidate)) is None:
                return candidate
            warn(f"warning: skipping checkpoint {candidate}: {problem}")
        if found:
            raise ConfigError(f"no checkpoint in {output_dir / 'checkpoints'} is complete (nor can one from before checkpoints "
                              f"had a {MANIFEST} be resumed); start over with --train.overwrite true (the old ones are moved "
                              "aside, not deleted)")
        return None
    path = Path(resume)
    if not path.is_dir() or not CHECKPOINT_PATTERN.match(path.name):
        raise ConfigError(f"--resume {resume}: not a checkpoint directory; pass 'latest' or a {output_dir}/checkpoints/step_N path")
    if problem := manifest_problem(path):
        raise ConfigError(f"--resume {resume}: {problem}; pass 'latest' to take the newest complete checkpoint")
    return path


def set_aside(output_dir: Path, paths: list[Path]) -> Path:
    """Move ``paths`` (inside ``output_dir``) under ``output_dir/abandoned/<UTC time>/``, keeping their relative paths."""
    target = output_dir / "abandoned" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for path in paths:
        destination = target / path.relative_to(output_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    return target


EMA_FILE = "ema.safetensors"
LOOP_STATE_FILE = "loop_state.json"
CONFIG_FILE = "config.yaml"


@dataclass
class Progress:
    """The loop's own state, saved in every checkpoint (JSON) next to model, EMA, optimizer and LR schedule."""

    step: int = 0
    images_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images_seen = state["step"], state["images_seen"]

    def reached(self, max_steps: int | None) -> bool:
        """Whether the step budget is spent (never without one)."""
        return max_steps is not None and self.step >= max_steps


def save_loop_state(directory: Path, ema: EMAModel, progress: Progress, cfg: Config) -> None:
    """What ``save_state`` does not hold, without pickles: EMA weights (safetensors), EMA and loop counters (JSON),
    and the resolved config (YAML) that resume compares against."""
    save_file({str(i): p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)}, directory / EMA_FILE)
    counters = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    (directory / LOOP_STATE_FILE).write_text(json.dumps({"progress": progress.state_dict(), "ema": counters}) + "\n")
    cfg.save(directory / CONFIG_FILE)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, ema: EMAModel, progress: Progress) -> None:
    """Model, optimizer, LR schedule and RNG through ``load_state`` (``weights_only=True``), then EMA and progress."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # e.g. an UnpicklingError: weights_only refused an object in an optimizer file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"checkpoint {checkpoint} cannot be loaded ({type(error).__name__}: {first_line}); "
                          "resume from another one") from None
    # A checkpoint is at a step boundary: count micro-batches from there, whatever accumulation it was saved with.
    accelerator.step = 0
    state = json.loads((checkpoint / LOOP_STATE_FILE).read_text())
    shadow = load_file(checkpoint / EMA_FILE)  # to the CPU: safetensors refuses devices such as gloo ranks' "cpu:0"
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)].to(accelerator.device) for i in range(len(shadow))]})
    progress.load_state_dict(state["progress"])


class DiskFullError(Exception):
    """A checkpoint did not fit on the output directory's disk (or quota). Its message is the one line for the user:
    the disk, the last good checkpoint, the fix. ``pipeline/train.py`` prints it and exits ``EXIT_DISK_FULL``."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, says the disk or the quota is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS or any(text in str(error) for text in DISK_FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_problem(output_dir: Path, failed: Path, error: BaseException) -> str | None:
    """The user's line if writing the checkpoint ``failed`` raised ``error`` for want of space, else None (a bug).
    Full when the error says so, or when the disk has less room left than the last complete checkpoint took (torch
    reports a short write in words of its own). Called while the partial write is still there, filling the disk."""
    found = list_checkpoints(output_dir)
    free = shutil.disk_usage(output_dir).free
    last_size = sum(p.stat().st_size for p in found[-1].rglob("*") if p.is_file()) if found else 0
    if not (is_disk_full(error) or free < last_size):
        return None
    first_line = (str(error).strip().splitlines() or [""])[0]
    return (f"the disk holding {output_dir} is full (or over quota; {free / 2**20:.0f} MiB free): checkpoint {failed.name} could "
            f"not be written ({type(error).__name__}: {first_line}); its partial copy was removed; last good checkpoint: "
            f"{found[-1] if found else 'none'}; free space on that disk (or move train.output_dir) and "
            + ("resume with --resume latest" if found else "start again"))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int, write_extra: Callable[[Path], None]) -> Path:
    """Write the full training state atomically: ``save_state``, then ``write_extra(directory)`` on the main process,
    then the manifest. Then prune: of the checkpoints older than this one, keep the newest ``keep - 1``. If the write
    fails, its partial directory is removed (it would hold the space a resume needs); DiskFullError for a full disk."""
    final = checkpoint_dir(output_dir, step)
    tmp = build_dir(final)
    try:
        if accelerator.is_main_process:
            start_build(final)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_extra(tmp)
            write_manifest(tmp)
            replace_dir(tmp, final)  # also over the same step saved before (e.g. a stop right after a periodic save)
    except Exception as error:
        problem = disk_full_problem(output_dir, final, error)
        shutil.rmtree(tmp, ignore_errors=True)
        if problem is None:
            raise
        raise DiskFullError(problem) from error
    if accelerator.is_main_process:
        older = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) < step]
        for old in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in final.parent.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class StopSignal:
    """Records SIGUSR1/SIGTERM while installed; ``restore`` puts the previous handlers back."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
