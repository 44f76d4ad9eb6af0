"""One run per output directory: a lock for the run's life, its status for job scripts, one config per start.

A fresh start where checkpoints exist is refused (``--resume latest`` continues the run, ``train.overwrite``
moves the old one aside), and resuming from an older checkpoint moves the newer ones aside: runs never mix. A
``pipeline/`` that is not an export (the run's export would replace it) is refused at the start, before any step.
A start refused before it began (``RunLock.undo``) leaves the directory as it found it.
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
    """An exclusive ``flock`` on ``<output_dir>/.lock``, held by the main process until ``release``, and what taking
    it changed (the folders it made, the lock file and ``status.json`` as they were), which ``undo`` puts back."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.path, self.made = output_dir, output_dir / ".lock", []
        while True:  # once, unless the lock file goes (a refused start's undo) between its open and its flock here
            self.made += _make_dirs(output_dir)
            try:
                self.handle, self.created = open(self.path, "x+"), True
            except FileExistsError:
                try:
                    self.handle, self.created = open(self.path, "r+"), False
                except FileNotFoundError:
                    continue
            except FileNotFoundError:  # the folder went since
                continue
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.handle.read().strip() or "another process"
                self.handle.close()
                raise ConfigError(f"{output_dir} is in use by another run ({holder} holds {self.path}); "
                                  "wait for it to end or pick another train.output_dir") from None
            if _same_file(self.handle.fileno(), self.path):
                break
            self.handle.close()
        self.lock_text = self.handle.read()
        status = output_dir / "status.json"
        self.status_bytes = status.read_bytes() if status.exists() else None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self) -> None:
        self.handle.close()

    def undo(self) -> None:
        """Put the directory back as this start found it, then release: ``status.json`` and ``.lock`` as they were
        (removed where they were not there), and the folders this start made removed (while still empty)."""
        status = self.output_dir / "status.json"
        if self.status_bytes is None:
            status.unlink(missing_ok=True)
        else:
            _replace_bytes(status, self.status_bytes)
        if self.created:
            self.path.unlink()  # under the lock: a start that opened it meanwhile sees it gone and retries
        else:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(self.lock_text)
        self.release()
        for folder in reversed(self.made):
            try:
                folder.rmdir()
            except OSError:  # no longer empty: another start's now
                break


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the folders this call created, outermost first."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            made.append(folder)
        except FileExistsError:  # made meanwhile by another start
            pass
    return made


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path`` (not removed nor replaced since it was opened)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def write_status(output_dir: Path, status: str, step: int | None = None) -> None:
    """``<output_dir>/status.json``: starting, running, finished, stopped_early (resume to continue) or diverged.
    Job scripts read it because ``accelerate launch`` reports any non-zero worker exit, 75 included, as 1."""
    _replace_bytes(output_dir / "status.json", (json.dumps({"status": status, "step": step}) + "\n").encode())


def read_status(output_dir: Path) -> str | None:
    """The status ``write_status`` last wrote in ``output_dir``, None without one."""
    path = output_dir / "status.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def _replace_bytes(path: Path, data: bytes) -> None:
    """``path`` holding ``data``, swapped in whole (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def grid_path(output_dir: Path, step: int) -> Path:
    """Where the sample grid of ``step`` goes: ``<output_dir>/samples/step_N.png``."""
    return output_dir / "samples" / f"step_{step:08d}.png"


def latest_grid(output_dir: Path) -> Path | None:
    """The newest sample grid in ``output_dir`` (``grid_path``), None before the first."""
    return max(grid_path(output_dir, 0).parent.glob("step_*.png"), default=None)


def save_start_config(cfg: Config, output_dir: Path, step: int) -> None:
    """``config.yaml`` (the latest start's) and ``configs/start-NNN-step_S.yaml`` (every start's, never overwritten)."""
    history = output_dir / "configs"
    history.mkdir(exist_ok=True)
    cfg.save(history / f"start-{len(list(history.glob('start-*.yaml'))) + 1:03d}-step_{step:08d}.yaml")
    cfg.save(output_dir / "config.yaml")
