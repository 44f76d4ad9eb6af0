"""The training loop: Accelerate (DDP, bf16 autocast), diffusers EMA, TensorBoard, atomic checkpoints, resume.

Everything random in a step (noise, timesteps, label dropout, flips, translations, Cutout squares, dropout
masks) is drawn for the whole global batch from generators seeded by ``(seed, step)`` on every rank, and each
micro-batch takes its rows. So a run is a pure function of its config: a resumed run repeats an uninterrupted
one bit for bit, and 2 processes x batch B take the same step as 1 process x batch 2B, dropout included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.checkpointing import (
    EXIT_DIVERGED,
    EXIT_STOPPED_EARLY,
    StopSignal,
    fsync_tree,
    list_checkpoints,
    replace_dir,
    resolve_resume,
    save_checkpoint,
)
from pipeline.config import Config, ConfigError, TrainConfig, load_config
from pipeline.data import (
    ImageData,
    ImageDataset,
    check_augmentation,
    cutout_where,
    flip_where,
    keep_batch,
    load_image_data,
    to_model_range,
    translate_where,
    translation_border,
)
from pipeline.diffusion import diffusion_loss, make_train_scheduler
from pipeline.export import save_export
from pipeline.model_card import TrainingRecord
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.run_dir import RunLock, claim, save_start_config, write_status
from pipeline.sampling import sample_images

if TYPE_CHECKING:  # imported when evaluation is asked for: it loads the data set's classifier
    from pipeline.evaluation import Evaluator


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


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A fresh permutation each epoch, a function of (seed, epoch) alone, so resume needs no sampler state.
    Yields a whole number of global batches, so every epoch is a whole number of optimizer steps."""

    def __init__(self, length: int, seed: int, global_batch: int):
        self.length, self.seed, self.epoch = length, seed, 0
        self.used = length - length % global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.used

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator)[: self.used].tolist())


def make_loader(data: ImageData, micro_batch: int, seed: int, global_batch: int) -> torch.utils.data.DataLoader:
    """Batches of (uint8 (B, C, H, W), int64 (B,)) gathered from the decoded cache in one indexing call each,
    in process: no workers, as a gather is far faster than the model step (bench/input_pipeline.py). Pinned
    when a GPU is present, so the host-to-device copy of the (uint8, 4x smaller than float) batch is asynchronous.
    ConfigError for a data set smaller than one global batch."""
    if len(data) < global_batch:
        raise ConfigError(f"the data set has {len(data)} images, fewer than train.batch_size {global_batch}")
    return torch.utils.data.DataLoader(
        ImageDataset(data), batch_size=micro_batch, sampler=EpochShuffle(len(data), seed, global_batch), drop_last=True,
        collate_fn=keep_batch, pin_memory=torch.cuda.is_available(),
    )


def build_unet(cfg: Config, data: ImageData) -> ConditionalUNet:
    """The U-Net for ``cfg.model`` at the data set's size, channels and classes, with a null class when labels are
    dropped (``diffusion.p_uncond`` > 0). ConfigError for what it cannot do, ``sample.guidance_scale`` included."""
    try:
        unet = ConditionalUNet(**dataclasses.asdict(cfg.model), sample_size=data.size, in_channels=data.channels,
                               num_classes=len(data.class_names), class_names=data.class_names,
                               use_null_class=cfg.diffusion.p_uncond > 0)
    except ValueError as error:  # the model's own checks of its config (sizes, heads): bad input
        raise ConfigError(str(error)) from None
    sample = cfg.sample
    try:
        ConditionalDiffusionPipeline(unet=unet, scheduler=None).check_guidance(sample.guidance_scale, sample.guidance_interval,
                                                                               sample.guidance_ramp)
    except ValueError as error:  # the pipeline's guidance rule, now rather than at the first sample grid or export
        raise ConfigError(f"sample.{error}") from None
    return unet


@dataclass
class StepDraws:
    """The random draws of one optimizer step for its whole global batch: noise (B, C, H, W), timesteps (B,),
    label dropout (B,), horizontal flips (B,), translations (B, 2) in [-translate, translate] (down, right),
    Cutout centres (B, 2) in [0, size) (row, column) and the seed of the dropout masks, a function of
    (seed, step, translate) alone."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    drop: torch.Tensor
    flip: torch.Tensor
    shifts: torch.Tensor
    centers: torch.Tensor
    dropout_seed: int

    @classmethod
    def draw(cls, seed: int, step: int, batch: int, image_shape: torch.Size, num_timesteps: int, p_uncond: float,
             device: torch.device, translate: int = 0) -> StepDraws:
        g = torch.Generator(device).manual_seed(hash((seed, step)) & 0x7FFF_FFFF_FFFF)
        noise = torch.randn((batch, *image_shape), generator=g, device=device)
        timesteps = torch.randint(0, num_timesteps, (batch,), generator=g, device=device)
        drop = torch.rand(batch, generator=g, device=device) < p_uncond
        flip = torch.rand(batch, generator=g, device=device) < 0.5
        # Drawn after the others, which so stay bit for bit what they were before augmentation existed (resumed and
        # compared runs agree); drawn whether used or not (a few bytes), so the fields are always tensors.
        # Images are square (data._decode checks), so one bound serves rows and columns.
        shifts = torch.randint(-translate, translate + 1, (batch, 2), generator=g, device=device)
        centers = torch.randint(0, image_shape[-1], (batch, 2), generator=g, device=device)
        return cls(noise, timesteps, drop, flip, shifts, centers, dropout_seed=hash((seed, step, 1)))


def export_pipeline(unet: ConditionalUNet, scheduler, output_dir: Path, record: TrainingRecord | None = None) -> Path:
    """``save_pretrained`` into ``output_dir/pipeline`` through a temporary directory, flushed to disk before the swap
    (never half-written), with the code that opens it in plain diffusers and, given ``record``, a model card
    (``pipeline.export``)."""
    final = output_dir / "pipeline"
    build = output_dir / ".tmp-pipeline"
    save_export(ConditionalDiffusionPipeline(unet=unet, scheduler=scheduler), build, record)
    fsync_tree(build)
    replace_dir(build, final)
    return final


EMA_FILE = "ema.safetensors"
LOOP_STATE_FILE = "loop_state.json"
CONFIG_FILE = "config.yaml"


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


# Changing these mid-run makes a different run, not a continuation: resume refuses them.
FIXED_ON_RESUME = ("model.", "diffusion.", "data.", "train.batch_size", "train.seed")


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


def apply_optimisation(train_cfg: TrainConfig, optimizer: torch.optim.Optimizer, lr_scheduler, ema: EMAModel) -> None:
    """Put this start's learning rate, AdamW and EMA settings into the states a checkpoint restored. The LR at the
    current step is recomputed from the new peak and schedule (the schedule's shape comes from this config)."""
    schedule = lr_scheduler.scheduler  # accelerate's wrapper around the LambdaLR
    schedule.base_lrs = [train_cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group.update(initial_lr=train_cfg.lr, lr=train_cfg.lr * factor(schedule.last_epoch),
                     betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), weight_decay=train_cfg.weight_decay)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    ema.decay, ema.use_ema_warmup, ema.power = train_cfg.ema_decay, train_cfg.ema_warmup, train_cfg.ema_power


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
    sync, only when logging), the last gradient norm, and the step, images seen and time of the last log."""

    def __init__(self, accelerator: Accelerator, progress: Progress, max_steps: int | None):
        self.bar = tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train",
                        mininterval=0.1 if sys.stderr.isatty() else 30)  # a batch log file gets a line every 30 s, not every step
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.accumulation = accelerator.gradient_accumulation_steps
        self.grad_norm: torch.Tensor | None = None  # set where gradients are clipped (train.max_grad_norm)
        self.started = self.logged_at = time.time()
        self.logged_step, self.logged_images = progress.step, progress.images_seen

    def add(self, loss: torch.Tensor) -> None:
        """Add a micro-batch's loss (on the device: no host sync) to the sum of per-step means."""
        self.loss_sum += loss / self.accumulation

    def minutes(self) -> float:
        """Minutes since this start began training."""
        return (time.time() - self.started) / 60

    def watched(self) -> list[torch.Tensor]:
        """The tensors ``FiniteGuard`` checks every step: the loss sum and the gradient norm."""
        return [self.loss_sum] + ([self.grad_norm] if self.grad_norm is not None else [])

    def log(self, accelerator: Accelerator, progress: Progress, steps_per_epoch: int, lr: float, ema_decay: float) -> None:
        """``train/*`` at ``progress.step``: the mean loss over processes and steps and the images/s since the last
        log, then the learning rate, epoch, EMA decay, gradient norm and (CUDA) peak memory."""
        now = time.time()
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


def train_step(accelerator: Accelerator, model: torch.nn.Module, unet: ConditionalUNet, noise_scheduler: DDPMScheduler, cfg: Config,
               draws: StepDraws, micro: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One micro-batch, (B, C, H, W) uint8 ``images`` and (B,) ``labels``: noise the images at random timesteps,
    predict with ``model`` (``unet`` as it trains), backprop. Returns the loss, detached.

    The optimizer step's ``draws`` cover its whole global batch on every rank: micro-batch ``micro`` of rank r holds
    global batch positions (micro * world + r) * B..., as Accelerate deals batches round-robin.
    """
    first = (micro * accelerator.num_processes + accelerator.process_index) * len(images)
    mine = slice(first, first + len(images))
    noise, timesteps, drop, flip = draws.noise[mine], draws.timesteps[mine], draws.drop[mine], draws.flip[mine]
    clean = to_model_range(images)
    if cfg.data.random_flip:
        clean = flip_where(clean, flip)
    if cfg.data.translate:
        border = translation_border(clean.shape[1], black=-1.0)  # uint8 0 is -1 in the model's range
        clean = translate_where(clean, draws.shifts[mine], cfg.data.translate, border)
    if cfg.data.cutout:  # 0, the middle of [-1, 1]: the paper zeroes normalised images
        clean = cutout_where(clean, draws.centers[mine], cfg.data.cutout, value=0.0)
    if unet.null_class is not None:
        labels = torch.where(drop, unet.null_class, labels)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    if cfg.train.channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    unet.set_dropout_rows(draws.dropout_seed, mine, cfg.train.batch_size)
    with accelerator.autocast():
        prediction = model(noisy, timesteps, labels).sample
    loss = diffusion_loss(prediction, clean, noise, noisy, timesteps, noise_scheduler, cfg.diffusion)
    accelerator.backward(loss)
    return loss.detach()


def train(cfg: Config, resume: str | None = None) -> int:
    """Run training to a stop condition. Returns 0 when the budget is done, 75 when stopped early with a
    checkpoint (signal or ``max_minutes``), so a job script knows whether to requeue, 3 when it diverged."""
    output_dir = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train)
    with hold_output_dir(accelerator, output_dir) as stop:
        # Split the global batch, find the checkpoint to resume from and check its config, claim the output directory.
        micro_batch = micro_batch_size(accelerator, cfg.train)
        checkpoint = resolve_resume(output_dir, resume, accelerator.print)
        changes = resume_changes(load_config(checkpoint / CONFIG_FILE), cfg) if checkpoint else []
        claim_output_dir(accelerator, output_dir, checkpoint, cfg.train.overwrite)

        # Load the data; build the U-Net (seeded: every rank starts alike), its optimizer and LR schedule.
        data = load_image_data(cfg.data)
        check_augmentation(cfg.data, data.size)
        loader = make_loader(data, micro_batch, cfg.train.seed, cfg.train.batch_size)
        torch.manual_seed(cfg.train.seed)
        unet = build_unet(cfg, data)
        if cfg.train.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        noise_scheduler = make_train_scheduler(cfg.diffusion, cfg.model.learned_variance)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                      weight_decay=cfg.train.weight_decay, fused=accelerator.device.type == "cuda")
        steps_per_epoch = len(data) // cfg.train.batch_size  # EpochShuffle deals whole global batches
        max_steps = step_budget(cfg.train, steps_per_epoch)
        lr_scheduler = get_scheduler(cfg.train.lr_schedule, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                     num_training_steps=max_steps or 10**9)

        # Wrap them for the processes: `model` is what trains (DDP, compiled if asked), `unet` the bare U-Net inside it,
        # which the EMA, samples and exports read.
        model, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
        unet = accelerator.unwrap_model(model)
        model = torch.compile(model) if cfg.train.compile else model
        ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup,
                       power=cfg.train.ema_power, foreach=True, model_cls=ConditionalUNet, model_config=unet.config)
        ema.to(accelerator.device)

        # Resume weights, optimizer, LR schedule, RNG, EMA and progress from the checkpoint, with this start's settings;
        # record the start (config, status, TensorBoard) and build the evaluator.
        progress = resume_from(accelerator, checkpoint, resume, changes, cfg, optimizer, lr_scheduler, ema)
        start_logs(accelerator, cfg, progress, micro_batch, steps_per_epoch, unet)
        evaluator = make_evaluator(accelerator, cfg)

        # Train until the budget is spent, a process is asked to stop, or the loss diverges.
        batches = endless_batches(accelerator, loader, steps_per_epoch, progress.step)
        meter, guard = Meter(accelerator, progress, max_steps), FiniteGuard(accelerator.device)
        stop_reason = "finished" if progress.reached(max_steps) else None
        while stop_reason is None:
            # Accumulate gradients over this rank's micro-batches; Accelerate syncs them and steps the optimizer on the last.
            draws = StepDraws.draw(cfg.train.seed, progress.step, cfg.train.batch_size, data.images.shape[1:],
                                   noise_scheduler.config.num_train_timesteps, cfg.diffusion.p_uncond, accelerator.device,
                                   cfg.data.translate)
            for micro in range(cfg.train.gradient_accumulation_steps):
                images, labels = next(batches)
                with accelerator.accumulate(model):
                    meter.add(train_step(accelerator, model, unet, noise_scheduler, cfg, draws, micro, images, labels))
                    if accelerator.sync_gradients and cfg.train.max_grad_norm is not None:
                        meter.grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            # Step the LR schedule and the EMA; note a non-finite loss or gradient norm on the device (no host sync).
            lr_scheduler.step()
            ema.step(unet.parameters())
            progress.step += 1
            progress.images_seen += cfg.train.batch_size
            meter.bar.update(1)
            guard.record(progress.step, meter.watched())

            # Log the mean loss, learning rate and speed every log_every steps.
            if _due(progress.step, cfg.train.log_every):
                meter.log(accelerator, progress, steps_per_epoch, lr_scheduler.get_last_lr()[0], ema.cur_decay_value or 0.0)

            # Agree across processes on stopping and on finite weights: a host sync, so only when a log or save is due.
            stop_reason = "finished" if progress.reached(max_steps) else None
            if not (stop_reason or _due(progress.step, cfg.train.log_every) or saves_due(progress.step, cfg.train)):
                continue
            guard.record(progress.step, [*unet.parameters(), *ema.shadow_params])
            stop_reason = guard.agree(accelerator, stop_reason or stop_request(stop, meter, cfg.train.max_minutes))
            if stop_reason == "diverged":
                report_divergence(accelerator, output_dir, guard.bad_step)
                break

            # Sample and evaluate the EMA model when due; checkpoint and export it when due and before stopping.
            if _due(progress.step, cfg.train.sample_every):
                log_samples(accelerator, ema, unet, noise_scheduler, cfg, progress.step, output_dir)
            if _due(progress.step, cfg.train.eval_every):
                log_metrics(accelerator, evaluator, ema, unet, noise_scheduler, cfg, progress.step)
            if stop_reason or _due(progress.step, cfg.train.checkpoint_every):
                save_checkpoint(accelerator, output_dir, progress.step, cfg.train.keep_checkpoints,
                                lambda directory: save_loop_state(directory, ema, progress, cfg))
            if stop_reason or _due(progress.step, cfg.train.export_every):
                export(accelerator, ema, unet, noise_scheduler, cfg, progress)

        # Close the logs, then record how the run ended for job scripts.
        meter.bar.close()
        accelerator.end_training()
        return finish(accelerator, output_dir, stop_reason, progress.step)


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
    """For one start: the output directory's lock (main process) and the stop signals' record (every process)."""
    lock = RunLock(output_dir) if accelerator.is_main_process else None
    stop = StopSignal()
    try:
        if lock:
            write_status(output_dir, "starting")  # first, so a crash from here on is not read as the last start's stop
        yield stop
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
    """Make ``output_dir`` hold this run alone (``run_dir.claim``): every rank checks, the main process moves aside."""
    claim(output_dir, checkpoint, overwrite, move=False)
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


def resume_from(accelerator: Accelerator, checkpoint: Path | None, resume: str | None, changes: list[str], cfg: Config,
                optimizer: torch.optim.Optimizer, lr_scheduler, ema: EMAModel) -> Progress:
    """The loop's progress: from ``checkpoint`` (its states loaded, then ``changes``, this start's optimisation
    settings, applied), else from step 0."""
    progress = Progress()
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, ema, progress)
        apply_optimisation(cfg.train, optimizer, lr_scheduler, ema)
        accelerator.print(f"resumed from {checkpoint} at step {progress.step}"
                          + "".join(f"\n  config change applied: {line}" for line in changes))
    elif resume == "latest":
        accelerator.print(f"no checkpoint in {Path(cfg.train.output_dir) / 'checkpoints'}; starting from step 0")
    return progress


def start_logs(accelerator: Accelerator, cfg: Config, progress: Progress, micro_batch: int, steps_per_epoch: int,
               unet: ConditionalUNet) -> None:
    """Record this start: its config and status ``running`` (main process), the TensorBoard tracker, and one line
    with the run's shape (job logs and tests read ``num_processes=``)."""
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        save_start_config(cfg, output_dir, progress.step)
        write_status(output_dir, "running", progress.step)
    accelerator.init_trackers("train")
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    accelerator.print(
        f"num_processes={accelerator.num_processes} micro_batch={micro_batch} global_batch={cfg.train.batch_size} "
        f"steps_per_epoch={steps_per_epoch} params={sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
        f"device={accelerator.device} mixed_precision={cfg.train.mixed_precision}"
        + (f" SLURM_RESTART_COUNT={restarts}" if restarts else "")
    )


def make_evaluator(accelerator: Accelerator, cfg: Config) -> Evaluator | None:
    """The main process's ``Evaluator`` when ``train.eval_every`` is set, else None. Built at start: a data set
    without a classifier (for accuracy, cfid) fails now, not at the first evaluation."""
    if not (cfg.train.eval_every and accelerator.is_main_process):
        return None
    from pipeline.evaluation import Evaluator  # loads the data set's classifier

    # distances to (up to 10,000 of) the images it trains on; cached on disk after the first evaluation
    reference = dataclasses.replace(cfg.data, max_samples=min(cfg.data.max_samples or 10_000, 10_000))
    return Evaluator(cfg.data.dataset, metrics=cfg.train.eval_metrics, reference=reference, device=accelerator.device)


def endless_batches(accelerator: Accelerator, loader: torch.utils.data.DataLoader, steps_per_epoch: int,
                    first_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches from optimizer step ``first_step`` on, epoch after epoch without end. It owns the
    epochs: ``set_epoch`` orders each one, and the epoch a resumed run starts in skips the steps already taken."""
    epoch, steps_taken = divmod(first_step, steps_per_epoch)
    while True:
        loader.set_epoch(epoch)
        skip = steps_taken * accelerator.gradient_accumulation_steps
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, steps_taken = epoch + 1, 0


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def saves_due(step: int, train_cfg: TrainConfig) -> bool:
    """Whether a checkpoint, export, sample grid or evaluation is due at ``step``."""
    return any(_due(step, every) for every in (train_cfg.checkpoint_every, train_cfg.export_every, train_cfg.sample_every,
                                               train_cfg.eval_every))


def stop_request(stop: StopSignal, meter: Meter, max_minutes: float | None) -> str | None:
    """Why this process would stop early: the signal it received, ``max_minutes`` when the time is up, else None."""
    if stop.received:
        return stop.received
    return "max_minutes" if max_minutes is not None and meter.minutes() >= max_minutes else None


EXIT_STATUS = {"finished": 0, "stopped_early": EXIT_STOPPED_EARLY, "diverged": EXIT_DIVERGED}


def finish(accelerator: Accelerator, output_dir: Path, stop_reason: str, step: int) -> int:
    """``status.json`` (job scripts read it, as ``accelerate launch`` reports any worker's exit 75 as 1) and the exit
    status for ``stop_reason``: ``finished``, ``diverged``, or why the run stopped early (with a checkpoint)."""
    status = stop_reason if stop_reason in EXIT_STATUS else "stopped_early"
    if status == "stopped_early":
        accelerator.print(f"stopping early at step {step} ({stop_reason}); checkpoint saved, resume with --resume latest")
    if accelerator.is_main_process:
        write_status(output_dir, status, step)
    return EXIT_STATUS[status]


def report_divergence(accelerator: Accelerator, output_dir: Path, bad_step: int) -> None:
    """One line on stderr naming the step and the last good checkpoint (nothing was saved after it)."""
    if accelerator.is_main_process:
        found = list_checkpoints(output_dir)
        last_good = found[-1] if found else None
        fix = f"resume with --resume {last_good}" if last_good else "start over with --train.overwrite true"
        print(f"error: training diverged: the loss, gradient norm or weights are not finite at step {bad_step}; nothing "
              f"was saved after it; last good checkpoint: {last_good or 'none'}; lower train.lr and {fix}", file=sys.stderr)


def ema_unet(ema: EMAModel, unet: ConditionalUNet) -> ConditionalUNet:
    """A copy of ``unet`` carrying the EMA weights, in eval mode."""
    copy = ConditionalUNet.from_config(unet.config).to(unet.device)
    ema.copy_to(copy.parameters())
    return copy.eval()


def export(accelerator: Accelerator, ema: EMAModel, unet: ConditionalUNet, scheduler, cfg: Config, progress: Progress) -> None:
    """The EMA model as ``<output_dir>/pipeline``, with its model card."""
    if accelerator.is_main_process:
        accelerator.get_tracker("tensorboard", unwrap=True).flush()  # the model card reads the last eval/* metrics
        record = TrainingRecord.of_this_process(cfg, progress.step, progress.images_seen)
        export_pipeline(ema_unet(ema, unet), scheduler, Path(cfg.train.output_dir), record)
    accelerator.wait_for_everyone()


@torch.no_grad()
def log_samples(
    accelerator: Accelerator, ema: EMAModel, unet: ConditionalUNet, scheduler, cfg: Config, step: int, output_dir: Path, per_class: int = 8
) -> None:
    """One row per class from the EMA model into TensorBoard (``samples``) and ``samples/step_N.png``."""
    if accelerator.is_main_process:
        pipe = ConditionalDiffusionPipeline(unet=ema_unet(ema, unet), scheduler=scheduler)
        with accelerator.autocast():  # bf16 sampling is 2x faster on CPU at the same accuracy (docs/performance.md)
            images = sample_images(pipe, cfg.sample, list(range(unet.config.num_classes)), cfg.train.seed,
                                   num_images_per_label=per_class, output_type="pt").images
        grid = torchvision.utils.make_grid(images, nrow=per_class, padding=1)
        accelerator.get_tracker("tensorboard").log_images({"samples": grid[None].numpy()}, step=step)
        (output_dir / "samples").mkdir(exist_ok=True)
        torchvision.utils.save_image(grid, output_dir / "samples" / f"step_{step:08d}.png")
    accelerator.wait_for_everyone()


@torch.no_grad()
def log_metrics(accelerator: Accelerator, evaluator: Evaluator, ema: EMAModel, unet: ConditionalUNet, scheduler, cfg: Config,
                step: int) -> None:
    """``train.eval_metrics`` of the EMA model (``eval/accuracy``, ``eval/cfid``, ``eval/fid`` in TensorBoard)."""
    if accelerator.is_main_process:
        from pipeline.evaluation import evaluate_for_training

        pipe = ConditionalDiffusionPipeline(unet=ema_unet(ema, unet), scheduler=scheduler)
        metrics = evaluate_for_training(pipe, evaluator, cfg.train.eval_per_class, cfg.sample, cfg.train.seed)
        accelerator.log(metrics, step=step)
    accelerator.wait_for_everyone()
