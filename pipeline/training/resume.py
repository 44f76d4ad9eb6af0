"""The resume rules: which config changes a checkpoint accepts, and how a start continues from one.

A resumed start loads every state the checkpoint holds, then applies its own optimisation settings (learning rate,
AdamW, EMA), which may change between starts; what defines the run (model, diffusion, data, distillation, global batch, seed)
may not.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpointing import load_checkpoint
from pipeline.config import Config, TrainConfig
from pipeline.errors import ConfigError
from pipeline.training.state import TrainingState

# Changing these mid-run makes a different run, not a continuation: resume refuses them.
FIXED_ON_RESUME = ("model.", "diffusion.", "data.", "distill.", "train.batch_size", "train.seed")


def resume_changes(saved: Config, cfg: Config) -> list[str]:
    """The config keys that differ from the checkpoint's, as printable lines; ConfigError if any is fixed on resume.
    (Processes and accumulation steps may change: the global batch's sample order and draws do not depend on them.)"""
    old, new = _flatten(saved.to_dict()), _flatten(cfg.to_dict())
    changed = [key for key in new if old.get(key) != new[key]]
    if refused := [key for key in changed if key.startswith(FIXED_ON_RESUME)]:
        diff = ", ".join(f"{key} {old.get(key)!r} -> {new[key]!r}" for key in refused)
        raise ConfigError(f"resume refuses a changed {diff}: the checkpoint was trained with the former; "
                          "resume with its values, or start a new run in another train.output_dir")
    return [f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in changed]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def apply_optimisation(state: TrainingState, train_cfg: TrainConfig) -> None:
    """Put this start's learning rate, AdamW and EMA settings into the states a checkpoint restored. The LR at the
    current step is recomputed from the new peak and schedule (the schedule's shape comes from this config), times each
    parameter group's ``lr_scale`` (``models.build.parameter_groups``)."""
    optimizer, ema = state.optimizer, state.ema
    schedule = state.lr_scheduler.scheduler  # accelerate's wrapper around the LambdaLR
    schedule.base_lrs = [train_cfg.lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
        group.update(initial_lr=base, lr=base * factor(schedule.last_epoch),
                     betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), weight_decay=train_cfg.weight_decay)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    ema.decay, ema.use_ema_warmup, ema.power = train_cfg.ema_decay, train_cfg.ema_warmup, train_cfg.ema_power


def resume_from(state: TrainingState, cfg: Config, checkpoint: Path | None, resume: str | None, changes: list[str]) -> None:
    """Continue from ``checkpoint``: load its states into ``state`` (``progress`` included), then apply ``changes``,
    this start's optimisation settings. Without one, ``state`` stays at step 0."""
    accelerator = state.accelerator
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state.ema, state.progress)
        apply_optimisation(state, cfg.train)
        accelerator.print(f"resumed from {checkpoint} at step {state.progress.step}"
                          + "".join(f"\n  config change applied: {line}" for line in changes))
    elif resume == "latest":
        accelerator.print(f"no checkpoint in {Path(cfg.train.output_dir) / 'checkpoints'}; starting from step 0")
