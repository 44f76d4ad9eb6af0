"""What one start of a run settles before its first step: Accelerate, the output directory, the batch split, the
step budget, and the record of the start (its config, status and one line with the run's shape). Until that record,
a start refused as bad input leaves the output directory as it found it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration

from pipeline.checkpointing import StopSignal
from pipeline.config import Config, TrainConfig
from pipeline.errors import ConfigError
from pipeline.run_dir import RunLock, claim, read_status, save_start_config, write_status
from pipeline.training.state import TrainingState


def make_accelerator(train_cfg: TrainConfig) -> Accelerator:
    """Accelerate for ``train_cfg``: precision, accumulation, TensorBoard in ``<output_dir>/tensorboard``."""
    output_dir = Path(train_cfg.output_dir)
    return Accelerator(
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # one LR step per optimizer step, whatever the process count
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # with pinned batches, the copy overlaps compute
    )


@contextlib.contextmanager
def hold_output_dir(accelerator: Accelerator, output_dir: Path) -> Iterator[StopSignal]:
    """For one start: the output directory's lock (main process) and the stop signals' record (every process). Bad
    input (ConfigError) before ``start_logs`` recorded the start (status still ``starting``) undoes the lock's
    changes: the directory is left as it was found, or not there if it was not (a crash keeps ``starting``)."""
    lock = RunLock(output_dir) if accelerator.is_main_process else None
    stop = StopSignal()
    try:
        if lock:
            write_status(output_dir, "starting")  # first, so a crash from here on is not read as the last start's stop
        yield stop
    except ConfigError:
        if lock and read_status(output_dir) == "starting":
            lock.undo()
        raise
    finally:
        stop.restore()
        if lock:
            lock.release()


def micro_batch_size(accelerator: Accelerator, train_cfg: TrainConfig) -> int:
    """Images per micro-batch: the global batch split over processes and accumulation steps, which must divide it."""
    per_step = accelerator.num_processes * train_cfg.gradient_accumulation_steps
    if train_cfg.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size {train_cfg.batch_size} must be divisible by processes x accumulation steps = {per_step}; "
            f"use a multiple of {per_step}"
        )
    return train_cfg.batch_size // per_step


def claim_output_dir(accelerator: Accelerator, output_dir: Path, checkpoint: Path | None, overwrite: bool) -> None:
    """Make ``output_dir`` hold this run alone (``run_dir.claim``) once the start is known to be good: every rank
    checked it first (``claim(..., move=False)``, before the data loads), and here the main process moves aside."""
    accelerator.wait_for_everyone()  # every rank has read the checkpoints before the main process moves any aside
    if accelerator.is_main_process and (moved := claim(output_dir, checkpoint, overwrite, move=True)):
        accelerator.print(moved)


def step_budget(train_cfg: TrainConfig, steps_per_epoch: int) -> int | None:
    """The optimizer steps ``train.max_steps`` and ``train.max_epochs`` allow (the fewer), None without either."""
    limits = [s for s in (train_cfg.max_steps, train_cfg.max_epochs and train_cfg.max_epochs * steps_per_epoch) if s]
    max_steps = min(limits) if limits else None
    if max_steps is None and train_cfg.lr_schedule != "constant":
        raise ConfigError(f"train.lr_schedule {train_cfg.lr_schedule} needs a length: set train.max_steps or train.max_epochs")
    return max_steps


def start_logs(state: TrainingState, cfg: Config, micro_batch: int, steps_per_epoch: int) -> None:
    """Record this start: its config and status ``running`` (main process), the TensorBoard tracker, and one line
    with the run's shape (job logs and tests read ``num_processes=``)."""
    accelerator, step, unet = state.accelerator, state.progress.step, state.unet
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        save_start_config(cfg, output_dir, step)
        write_status(output_dir, "running", step)
    accelerator.init_trackers("train")
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    accelerator.print(
        f"num_processes={accelerator.num_processes} micro_batch={micro_batch} global_batch={cfg.train.batch_size} "
        f"steps_per_epoch={steps_per_epoch} params={sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
        f"device={accelerator.device} mixed_precision={cfg.train.mixed_precision}"
        + (f" SLURM_RESTART_COUNT={restarts}" if restarts else "")
    )
