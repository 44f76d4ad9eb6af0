"""Watching a run: its logs and progress bar, the divergence guard, when to stop, and how the run ended.

Nothing here reads a device value every step: the loss and the first non-finite step stay on the device until a
log or save is due, when the processes agree on them in one gather.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from pipeline.checkpointing import EXIT_DIVERGED, EXIT_STOPPED_EARLY, Progress, StopSignal, list_checkpoints
from pipeline.config import TrainConfig
from pipeline.run_dir import latest_grid, write_status
from pipeline.training.state import TrainingState


class FiniteGuard:
    """The first step whose loss, gradient norm or weights were not finite, kept on the device: recording costs
    no host sync; ``agree`` reads it, with the stop requests, across ranks every ``log_every`` steps and before saves."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        self.bad_step = 0

    def record(self, step: int, tensors: list[torch.Tensor]) -> None:
        finite = torch.stack([torch.isfinite(x).all() for x in tensors]).all()
        self.first_bad = torch.where(finite | (self.first_bad > 0), self.first_bad, step)

    def agree(self, accelerator: Accelerator, reason: str | None) -> str | None:
        """Why every rank stops, given why this one would (None: it would not): ``"diverged"`` if any rank saw a
        non-finite step (the first is then ``bad_step``), else ``reason``, else ``"a stop on another process"``."""
        local = torch.stack([torch.tensor(int(reason is not None), device=self.first_bad.device), self.first_bad])
        stops, bads = accelerator.gather(local[None]).view(-1, 2).T.tolist()
        self.bad_step = min((step for step in bads if step > 0), default=0)
        if self.bad_step:
            return "diverged"
        return reason or ("a stop on another process" if any(stops) else None)


class Meter:
    """The loop's logging state: the progress bar, the loss summed on the device since the last log (read, a host
    sync, only when logging), the last gradient norm, and the step, images seen and time of the last log. Times are
    ``time.monotonic()``: the wall clock set forward (NTP stepping it, say) must not end a run early at ``max_minutes``."""

    def __init__(self, accelerator: Accelerator, progress: Progress, max_steps: int | None):
        self.bar = tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train",
                        mininterval=0.1 if sys.stderr.isatty() else 30)  # a batch log file gets a line every 30 s, not every step
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.accumulation = accelerator.gradient_accumulation_steps
        self.grad_norm: torch.Tensor | None = None  # set where gradients are clipped (train.max_grad_norm)
        self.started = self.logged_at = time.monotonic()
        self.logged_step, self.logged_images = progress.step, progress.images_seen

    def add(self, loss: torch.Tensor) -> None:
        """Add a micro-batch's loss (on the device: no host sync) to the sum of per-step means."""
        self.loss_sum += loss / self.accumulation

    def minutes(self) -> float:
        """Minutes since this start began training."""
        return (time.monotonic() - self.started) / 60

    def watched(self) -> list[torch.Tensor]:
        """The tensors ``FiniteGuard`` checks every step: the loss sum and the gradient norm."""
        return [self.loss_sum] + ([self.grad_norm] if self.grad_norm is not None else [])

    def log(self, state: TrainingState, steps_per_epoch: int) -> None:
        """``train/*`` at ``state.progress.step``: the mean loss over processes and steps and the images/s since the
        last log, then the learning rate, epoch, EMA decay, gradient norm and (CUDA) peak memory."""
        accelerator, progress = state.accelerator, state.progress
        lr, ema_decay = state.lr_scheduler.get_last_lr()[0], state.ema.cur_decay_value or 0.0
        now = time.monotonic()
        logs = {
            "train/loss": accelerator.reduce(self.loss_sum, reduction="mean").item() / (progress.step - self.logged_step),
            "train/lr": lr,
            "train/images_per_s": (progress.images_seen - self.logged_images) / max(now - self.logged_at, 1e-9),
            "train/epoch": progress.step / steps_per_epoch,
            "train/ema_decay": ema_decay,
        }
        if self.grad_norm is not None:
            logs["train/grad_norm"] = float(self.grad_norm)
        if accelerator.device.type == "cuda":
            logs["train/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        accelerator.log(logs, step=progress.step)
        self.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", img_s=f"{logs['train/images_per_s']:.0f}")
        self.loss_sum.zero_()
        self.logged_at, self.logged_step, self.logged_images = now, progress.step, progress.images_seen


def due(step: int, every: int | None) -> bool:
    """Whether something done every ``every`` steps (never if None or 0) is due at ``step``."""
    return bool(every) and step % every == 0


def saves_due(step: int, train_cfg: TrainConfig) -> bool:
    """Whether a checkpoint, export, sample grid or evaluation is due at ``step``."""
    return any(due(step, every) for every in (train_cfg.checkpoint_every, train_cfg.export_every, train_cfg.sample_every,
                                              train_cfg.eval_every))


def stop_request(stop: StopSignal, meter: Meter, max_minutes: float | None) -> str | None:
    """Why this process would stop early: the signal it received, ``max_minutes`` when the time is up, else None."""
    if stop.received:
        return stop.received
    return "max_minutes" if max_minutes is not None and meter.minutes() >= max_minutes else None


EXIT_STATUS = {"finished": 0, "stopped_early": EXIT_STOPPED_EARLY, "diverged": EXIT_DIVERGED}


def finish(accelerator: Accelerator, output_dir: Path, stop_reason: str, step: int) -> int:
    """``status.json`` (job scripts read it, as ``accelerate launch`` reports any worker's exit 75 as 1), the log's
    last lines (``where_things_are``) and the exit status for ``stop_reason``: ``finished``, ``diverged``, or why the
    run stopped early (with a checkpoint)."""
    status = stop_reason if stop_reason in EXIT_STATUS else "stopped_early"
    if status == "stopped_early":
        accelerator.print(f"stopping early at step {step} ({stop_reason}); checkpoint saved, resume with --resume latest")
    elif status == "finished":
        accelerator.print(f"finished at step {step}")
    if status != "diverged":  # a diverged run says so and names its last good checkpoint (report_divergence)
        accelerator.print("\n".join(where_things_are(output_dir, Path(accelerator.logging_dir), status == "stopped_early")))
    if accelerator.is_main_process:
        write_status(output_dir, status, step)
    return EXIT_STATUS[status]


def where_things_are(output_dir: Path, tensorboard: Path, stopped_early: bool) -> list[str]:
    """The end of a run's log: its newest sample grid, its exported pipeline, the TensorBoard command, how to sample
    the pipeline, and for a run stopped early how to continue it; each path as given (relative to where it ran)."""
    pipeline, grid = output_dir / "pipeline", latest_grid(output_dir)
    lines = [f"  sample grid:   {grid or 'none written yet (see train.sample_every)'}",
             f"  pipeline:      {pipeline}",
             f"  curves:        tensorboard --logdir {shlex.quote(str(tensorboard))}",
             f"  sample it:     python -m pipeline.figures grid --pipeline {shlex.quote(str(pipeline))} --out grid.png",
             f"  in Python:     from pipeline import ConditionalDiffusionPipeline; "
             f"pipe = ConditionalDiffusionPipeline.from_pretrained({str(pipeline)!r})",
             f"  web demo:      python -m pipeline.demo --pipeline {shlex.quote(str(pipeline))}"]
    if stopped_early:
        lines.append(f"  continue:      the same command with --resume latest, e.g. python pipeline/train.py --config "
                     f"{shlex.quote(str(output_dir / 'config.yaml'))} --resume latest")
    return lines


def report_divergence(accelerator: Accelerator, output_dir: Path, bad_step: int) -> None:
    """One line on stderr naming the step and the last good checkpoint (nothing was saved after it)."""
    if accelerator.is_main_process:
        found = list_checkpoints(output_dir)
        last_good = found[-1] if found else None
        fix = f"resume with --resume {last_good}" if last_good else "start over with --train.overwrite true"
        print(f"error: training diverged: the loss, gradient norm or weights are not finite at step {bad_step}; nothing "
              f"was saved after it; last good checkpoint: {last_good or 'none'}; lower train.lr and {fix}", file=sys.stderr)
