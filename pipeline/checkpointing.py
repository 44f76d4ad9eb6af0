"""Crash-safe checkpoints and clean stops.

A checkpoint is ``accelerator.save_state`` written into ``checkpoints/.tmp-step_N`` and renamed to
``checkpoints/step_N`` only once every process has finished writing, so a crash, ``kill -9`` or preemption
mid-write leaves the previous checkpoint as the latest complete one. ``StopSignal`` turns SIGUSR1/SIGTERM
(SLURM's pre-timeout signal, preemption, Spot VM shutdown) into a flag that all ranks agree on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from types import FrameType

import torch
from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
EXIT_STOPPED_EARLY = 75  # EX_TEMPFAIL: stopped with a checkpoint; resume to continue


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of unfinished writes are not listed)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``latest`` -> newest complete checkpoint (or None if there is none); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir() or not (path / "custom_checkpoint_0.pkl").exists():
        raise ValueError(f"--resume {resume}: not a checkpoint directory; pass 'latest' or a {output_dir}/checkpoints/step_N path")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """Write the full training state atomically and keep only the newest ``keep`` checkpoints."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in final.parent.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(build: Path, final: Path) -> None:
    """Swap a fully written directory ``build`` into place at ``final`` (the old one stays until then)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(build, final)
    shutil.rmtree(old, ignore_errors=True)


class StopSignal:
    """Records SIGUSR1/SIGTERM; ``agreed`` all-reduces the flag so every rank stops at the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, accelerator: Accelerator, local_stop: bool) -> bool:
        flag = torch.tensor([1.0 if (local_stop or self.received) else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
