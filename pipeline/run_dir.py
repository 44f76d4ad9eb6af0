"""One run per output directory: a lock for the run's life, its status for job scripts, one config per start.

A fresh start where checkpoints exist is refused (``--resume latest`` continues the run, ``train.overwrite``
moves the old one aside), and resuming from an older checkpoint moves the newer ones aside: runs never mix. A
``pipeline/`` that is not an export (the run's export would replace it) is refused at the start, before any step.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from pipeline.atomic import replace_problem
from pipeline.checkpointing import checkpoint_step, list_checkpoints, set_aside
from pipeline.config import Config
from pipeline.errors import ConfigError

RUN_OUTPUTS = ("checkpoints", "pipeline", "tensorboard", "samples", "status.json")


class RunLock:
    """An exclusive ``flock`` on ``<output_dir>/.lock``, held by the main process until ``release``."""

    def __init__(self, output_dir: Path):
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / ".lock"
        self.handle = open(path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise ConfigError(f"{output_dir} is in use by another run ({holder} holds {path}); "
                              "wait for it to end or pick another train.output_dir") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self) -> None:
        self.handle.close()


def write_status(output_dir: Path, status: str, step: int | None = None) -> None:
    """``<output_dir>/status.json``: starting, running, finished, stopped_early (resume to continue) or diverged.
    Job scripts read it because ``accelerate launch`` reports any non-zero worker exit, 75 included, as 1."""
    tmp = output_dir / ".status.json.tmp"
    tmp.write_text(json.dumps({"status": status, "step": step}) + "\n")
    os.replace(tmp, output_dir / "status.json")


def claim(output_dir: Path, resume_from: Path | None, overwrite: bool, move: bool) -> str | None:
    """Make ``output_dir`` hold this run alone. Every rank checks (so every rank refuses alike); the one with ``move``
    (the main process, under the lock) moves another run's outputs aside. Returns what was moved, if anything.
    ConfigError for a used ``output_dir`` without ``overwrite``, and for a ``pipeline/`` there that is not an export
    and stays (the run's export would delete it): refused now rather than after hours of training."""
    found = list_checkpoints(output_dir)
    if resume_from is None and found and not overwrite:
        raise ConfigError(f"{output_dir} already holds checkpoints up to {found[-1].name}; continue that run with "
                          "--resume latest, or start over with --train.overwrite true (moves them aside)")
    moves_outputs = resume_from is None and bool(found)  # with overwrite: pipeline/ goes to abandoned/ with the rest
    if not moves_outputs and (problem := replace_problem(output_dir / "pipeline")):
        raise ConfigError(f"{problem}; move it out of {output_dir}, or pick another train.output_dir")
    if not move:
        return None
    if moves_outputs:
        moved = set_aside(output_dir, [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()])
        return f"the previous run's outputs were moved to {moved}"
    newer = [p for p in found if resume_from is not None and checkpoint_step(p) > checkpoint_step(resume_from)]
    if newer:
        return f"checkpoints newer than {resume_from.name} were moved to {set_aside(output_dir, newer)}"
    return None


def save_start_config(cfg: Config, output_dir: Path, step: int) -> None:
    """``config.yaml`` (the latest start's) and ``configs/start-NNN-step_S.yaml`` (every start's, never overwritten)."""
    history = output_dir / "configs"
    history.mkdir(exist_ok=True)
    cfg.save(history / f"start-{len(list(history.glob('start-*.yaml'))) + 1:03d}-step_{step:08d}.yaml")
    cfg.save(output_dir / "config.yaml")
