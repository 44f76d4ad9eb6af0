"""The training loop: Accelerate (DDP, bf16 autocast), diffusers EMA, TensorBoard, atomic checkpoints, resume.

Everything random in a step (noise, timesteps, label dropout, flips, dropout masks) is drawn for the whole
global batch from generators seeded by ``(seed, step)`` on every rank, and each micro-batch takes its rows.
So a run is a pure function of its config: a resumed run repeats an uninterrupted one bit for bit, and
2 processes x batch B take the same step as 1 process x batch 2B, dropout included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration
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
from pipeline.data import ImageData, ImageDataset, flip_where, keep_batch, load_image_data, to_model_range
from pipeline.diffusion import diffusion_loss, make_sampler, make_train_scheduler
from pipeline.export import save_export
from pipeline.model_card import TrainingRecord
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.run_dir import RunLock, claim, save_start_config, write_status


@dataclass
class Progress:
    """The loop's own state, saved in every checkpoint (JSON) next to model, EMA, optimizer and LR schedule."""

    step: int = 0
    images_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images_seen = state["step"], state["images_seen"]


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
    when a GPU is present, so the host-to-device copy of the (uint8, 4x smaller than float) batch is asynchronous."""
    return torch.utils.data.DataLoader(
        ImageDataset(data), batch_size=micro_batch, sampler=EpochShuffle(len(data), seed, global_batch), drop_last=True,
        collate_fn=keep_batch, pin_memory=torch.cuda.is_available(),
    )


def build_unet(cfg: Config, data: ImageData) -> ConditionalUNet:
    """The U-Net for ``cfg.model`` at the data set's size, channels and classes."""
    try:
        return _unet(cfg, data)
    except ValueError as error:  # the model's own checks of its config (sizes, heads): bad input
        raise ConfigError(str(error)) from None


def _unet(cfg: Config, data: ImageData) -> ConditionalUNet:
    m = cfg.model
    return ConditionalUNet(
        sample_size=data.size,
        in_channels=data.channels,
        num_classes=len(data.class_names),
        class_names=data.class_names,
        use_null_class=cfg.diffusion.p_uncond > 0,
        base_channels=m.base_channels,
        channel_mult=m.channel_mult,
        layers_per_block=m.layers_per_block,
        attention_resolutions=m.attention_resolutions,
        attention_heads=m.attention_heads,
        dropout=m.dropout,
        conditioning=m.conditioning,
        upsample=m.upsample,
        learned_variance=m.learned_variance,
    )


@dataclass
class StepDraws:
    """The random draws of one optimizer step for its whole global batch: noise (B, C, H, W), timesteps (B,),
    label dropout (B,) and horizontal flips (B,), a function of (seed, step) alone."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    drop: torch.Tensor
    flip: torch.Tensor

    @classmethod
    def draw(cls, seed: int, step: int, batch: int, image_shape: torch.Size, num_timesteps: int, p_uncond: float,
             device: torch.device) -> StepDraws:
        g = torch.Generator(device).manual_seed(hash((seed, step)) & 0x7FFF_FFFF_FFFF)
        return cls(
            noise=torch.randn((batch, *image_shape), generator=g, device=device),
            timesteps=torch.randint(0, num_timesteps, (batch,), generator=g, device=device),
            drop=torch.rand(batch, generator=g, device=device) < p_uncond,
            flip=torch.rand(batch, generator=g, device=device) < 0.5,
        )


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


def apply_optimisation(t: TrainConfig, optimizer: torch.optim.Optimizer, lr_scheduler, ema: EMAModel) -> None:
    """Put this start's learning rate, AdamW and EMA settings into the states a checkpoint restored. The LR at the
    current step is recomputed from the new peak and schedule (the schedule's shape comes from this config)."""
    schedule = lr_scheduler.scheduler  # accelerate's wrapper around the LambdaLR
    schedule.base_lrs = [t.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group.update(initial_lr=t.lr, lr=t.lr * factor(schedule.last_epoch), betas=(t.adam_beta1, t.adam_beta2),
                     weight_decay=t.weight_decay)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    ema.decay, ema.use_ema_warmup, ema.power = t.ema_decay, t.ema_warmup, t.ema_power


class FiniteGuard:
    """The first step whose loss, gradient norm or weights were not finite, kept on the device: recording costs
    no host sync; ``agree`` reads it, with the stop flag, across ranks every ``log_every`` steps and before saves."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)

    def record(self, step: int, tensors: list[torch.Tensor]) -> None:
        finite = torch.stack([torch.isfinite(x).all() for x in tensors]).all()
        self.first_bad = torch.where(finite | (self.first_bad > 0), self.first_bad, step)

    def agree(self, accelerator: Accelerator, stop: bool) -> tuple[bool, int]:
        """(any rank wants to stop, first non-finite step on any rank or 0)."""
        local = torch.stack([torch.tensor(int(stop), device=self.first_bad.device), self.first_bad])
        stops, bads = accelerator.gather(local[None]).view(-1, 2).T.tolist()
        bad = [step for step in bads if step > 0]
        return any(stops), min(bad) if bad else 0


def train(cfg: Config, resume: str | None = None) -> int:
    """Run training to a stop condition. Returns 0 when the budget is done, 75 when stopped early with a
    checkpoint (signal or ``max_minutes``), so a job script knows whether to requeue, 3 when it diverged."""
    t = cfg.train
    output_dir = Path(t.output_dir)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # one LR step per optimizer step, whatever the process count
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # with pinned batches, the copy overlaps compute
    )
    lock = RunLock(output_dir) if accelerator.is_main_process else None
    stop = StopSignal()
    try:
        if lock:
            write_status(output_dir, "starting")  # first, so a crash from here on is not read as the last start's stop
        return _train(cfg, resume, accelerator, stop)
    finally:
        stop.restore()
        if lock:
            lock.release()


def _train(cfg: Config, resume: str | None, accelerator: Accelerator, stop: StopSignal) -> int:
    t = cfg.train
    output_dir = Path(t.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = world * t.gradient_accumulation_steps
    if t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size {t.batch_size} must be divisible by processes x accumulation steps = {per_step}; "
            f"use a multiple of {per_step}"
        )
    micro_batch = t.batch_size // per_step
    checkpoint = resolve_resume(output_dir, resume, accelerator.print)
    changes = resume_changes(load_config(checkpoint / CONFIG_FILE), cfg) if checkpoint else []
    claim(output_dir, checkpoint, t.overwrite, move=False)
    accelerator.wait_for_everyone()  # every rank has read the checkpoints before the main process moves any aside
    if accelerator.is_main_process and (moved := claim(output_dir, checkpoint, t.overwrite, move=True)):
        accelerator.print(moved)

    data = load_image_data(cfg.data)
    if len(data) < t.batch_size:
        raise ConfigError(f"the data set has {len(data)} images, fewer than train.batch_size {t.batch_size}")
    loader = make_loader(data, micro_batch, t.seed, t.batch_size)
    torch.manual_seed(t.seed)
    unet = build_unet(cfg, data)
    if t.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    noise_scheduler = make_train_scheduler(cfg.diffusion, cfg.model.learned_variance)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
        fused=accelerator.device.type == "cuda",
    )
    steps_per_epoch = len(loader) // (world * t.gradient_accumulation_steps)
    limits = [s for s in (t.max_steps, t.max_epochs and t.max_epochs * steps_per_epoch) if s]
    max_steps = min(limits) if limits else None
    if max_steps is None and t.lr_schedule != "constant":
        raise ConfigError(f"train.lr_schedule {t.lr_schedule} needs a length: set train.max_steps or train.max_epochs")
    lr_scheduler = get_scheduler(t.lr_schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max_steps or 10**9)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    raw_unet: ConditionalUNet = accelerator.unwrap_model(unet)
    model = torch.compile(unet) if t.compile else unet
    ema = EMAModel(
        raw_unet.parameters(), decay=t.ema_decay, use_ema_warmup=t.ema_warmup, power=t.ema_power, foreach=True,
        model_cls=ConditionalUNet, model_config=raw_unet.config,
    )
    ema.to(accelerator.device)
    progress = Progress()
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, ema, progress)
        apply_optimisation(t, optimizer, lr_scheduler, ema)
        accelerator.print(f"resumed from {checkpoint} at step {progress.step}"
                          + "".join(f"\n  config change applied: {line}" for line in changes))
    elif resume == "latest":
        accelerator.print(f"no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
    if accelerator.is_main_process:
        save_start_config(cfg, output_dir, progress.step)
        write_status(output_dir, "running", progress.step)
    accelerator.init_trackers("train")
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    accelerator.print(
        f"num_processes={world} micro_batch={micro_batch} global_batch={t.batch_size} steps_per_epoch={steps_per_epoch} "
        f"params={sum(p.numel() for p in raw_unet.parameters()) / 1e6:.2f}M device={accelerator.device} "
        f"mixed_precision={t.mixed_precision}" + (f" SLURM_RESTART_COUNT={restarts}" if restarts else "")
    )

    def train_step(images: torch.Tensor, labels: torch.Tensor, micro: int, draws: StepDraws) -> torch.Tensor:
        """One micro-batch: noise the images at random timesteps, predict, backprop. Returns the loss."""
        # The whole optimizer step's randomness is drawn on every rank and sliced: micro-batch m of rank r holds
        # global batch positions (m * world + r) * micro_batch..., as Accelerate deals batches round-robin.
        mine = slice((micro * world + rank) * micro_batch, (micro * world + rank + 1) * micro_batch)
        noise, timesteps, drop, flip = draws.noise[mine], draws.timesteps[mine], draws.drop[mine], draws.flip[mine]
        clean = to_model_range(images)
        if cfg.data.random_flip:
            clean = flip_where(clean, flip)
        if raw_unet.null_class is not None:
            labels = torch.where(drop, raw_unet.null_class, labels)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        if t.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        raw_unet.set_dropout_rows(hash((t.seed, progress.step, 1)), mine, t.batch_size)
        with accelerator.autocast():
            prediction = model(noisy, timesteps, labels).sample
        loss = diffusion_loss(prediction, clean, noise, noisy, timesteps, noise_scheduler, cfg.diffusion)
        accelerator.backward(loss)
        return loss.detach()

    evaluator = None
    if t.eval_every and accelerator.is_main_process:
        from pipeline.evaluation import Evaluator  # loads the data set's classifier (accuracy, cfid); fails at start if there is none

        # distances to (up to 10,000 of) the images it trains on; cached on disk after the first evaluation
        reference = dataclasses.replace(cfg.data, max_samples=min(cfg.data.max_samples or 10_000, 10_000))
        evaluator = Evaluator(cfg.data.dataset, metrics=t.eval_metrics, reference=reference, device=accelerator.device)
    bar = tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train",
               mininterval=0.1 if sys.stderr.isatty() else 30)  # a batch log file gets a line every 30 s, not every step
    loss_sum = torch.zeros((), device=accelerator.device)
    guard = FiniteGuard(accelerator.device)
    steps_since_log = 0
    grad_norm = None
    started = last_log = time.time()
    images_at_log = progress.images_seen
    status = "finished"
    done = max_steps is not None and progress.step >= max_steps
    while not done:
        epoch, step_in_epoch = divmod(progress.step, steps_per_epoch)
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, step_in_epoch * t.gradient_accumulation_steps) if step_in_epoch else loader
        micro = 0
        for images, labels in epoch_loader:
            if micro == 0:  # once per optimizer step, shared by its micro-batches
                draws = StepDraws.draw(t.seed, progress.step, t.batch_size, images.shape[1:],
                                       noise_scheduler.config.num_train_timesteps, cfg.diffusion.p_uncond, accelerator.device)
            with accelerator.accumulate(unet):
                loss_sum += train_step(images, labels, micro, draws) / t.gradient_accumulation_steps
                if accelerator.sync_gradients and t.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            micro = 0
            lr_scheduler.step()
            ema.step(raw_unet.parameters())
            progress.step += 1
            progress.images_seen += t.batch_size
            steps_since_log += 1
            bar.update(1)
            step = progress.step
            guard.record(step, [loss_sum] + ([grad_norm] if grad_norm is not None else []))

            if _due(step, t.log_every):
                now = time.time()
                logs = {
                    "train/loss": accelerator.reduce(loss_sum, reduction="mean").item() / steps_since_log,
                    "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/images_per_s": (progress.images_seen - images_at_log) / max(now - last_log, 1e-9),
                    "train/epoch": progress.step / steps_per_epoch,
                    "train/ema_decay": ema.cur_decay_value or 0.0,
                }
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                if accelerator.device.type == "cuda":
                    logs["train/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                accelerator.log(logs, step=step)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", img_s=f"{logs['train/images_per_s']:.0f}")
                loss_sum.zero_()
                steps_since_log = 0
                last_log, images_at_log = now, progress.images_seen

            finished = max_steps is not None and step >= max_steps
            scheduled = [_due(step, every) for every in (t.checkpoint_every, t.export_every, t.sample_every, t.eval_every)]
            if not (finished or _due(step, t.log_every) or any(scheduled)):
                continue  # the cross-rank checks below sync with the host: only every log_every steps and before saves
            guard.record(step, [*raw_unet.parameters(), *ema.shadow_params])
            out_of_time = t.max_minutes is not None and (time.time() - started) / 60 >= t.max_minutes
            stop_now, bad_step = guard.agree(accelerator, bool(stop.received) or out_of_time)
            if bad_step:
                report_divergence(accelerator, output_dir, bad_step)
                done, status = True, "diverged"
                break
            if _due(step, t.sample_every):
                log_samples(accelerator, ema, raw_unet, noise_scheduler, cfg, step, output_dir)
            if _due(step, t.eval_every):
                log_metrics(accelerator, evaluator, ema, raw_unet, noise_scheduler, cfg, step)
            if finished or stop_now or _due(step, t.checkpoint_every):
                save_checkpoint(accelerator, output_dir, step, t.keep_checkpoints,
                                lambda directory: save_loop_state(directory, ema, progress, cfg))
            if finished or stop_now or _due(step, t.export_every):
                record = TrainingRecord.of_this_process(cfg, step, progress.images_seen)
                export(accelerator, ema, raw_unet, noise_scheduler, output_dir, record)
            if finished or stop_now:
                done = True
                if not finished:
                    status = "stopped_early"
                    reason = stop.received or ("max_minutes" if out_of_time else None)
                    accelerator.print(f"stopping early at step {step} ({reason}); checkpoint saved, resume with --resume latest")
                break
    bar.close()
    accelerator.end_training()
    if accelerator.is_main_process:
        write_status(output_dir, status, progress.step)
    return {"finished": 0, "stopped_early": EXIT_STOPPED_EARLY, "diverged": EXIT_DIVERGED}[status]


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


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


def export(accelerator: Accelerator, ema: EMAModel, unet: ConditionalUNet, scheduler, output_dir: Path, record: TrainingRecord) -> None:
    if accelerator.is_main_process:
        accelerator.get_tracker("tensorboard", unwrap=True).flush()  # the model card reads the last eval/* metrics
        export_pipeline(ema_unet(ema, unet), scheduler, output_dir, record)
    accelerator.wait_for_everyone()


@torch.no_grad()
def log_samples(
    accelerator: Accelerator, ema: EMAModel, unet: ConditionalUNet, scheduler, cfg: Config, step: int, output_dir: Path, per_class: int = 8
) -> None:
    """One row per class from the EMA model into TensorBoard (``samples``) and ``samples/step_N.png``."""
    if accelerator.is_main_process:
        from pipeline.evaluation.sampling import usable_guidance

        pipe = ConditionalDiffusionPipeline(unet=ema_unet(ema, unet), scheduler=make_sampler(cfg.sample.sampler, scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        guidance = usable_guidance(pipe, cfg.sample.guidance_scale)
        with accelerator.autocast():  # bf16 sampling is 2x faster on CPU at the same accuracy (docs/performance.md)
            images = pipe(
                class_labels=list(range(unet.config.num_classes)), num_images_per_label=per_class, guidance_scale=guidance,
                num_inference_steps=cfg.sample.num_inference_steps, generator=torch.Generator(pipe.device).manual_seed(cfg.train.seed),
                output_type="pt",
            ).images
        grid = torchvision.utils.make_grid(images, nrow=per_class, padding=1)
        accelerator.get_tracker("tensorboard").log_images({"samples": grid[None].numpy()}, step=step)
        (output_dir / "samples").mkdir(exist_ok=True)
        torchvision.utils.save_image(grid, output_dir / "samples" / f"step_{step:08d}.png")
    accelerator.wait_for_everyone()



@torch.no_grad()
def log_metrics(accelerator: Accelerator, evaluator, ema: EMAModel, unet: ConditionalUNet, scheduler, cfg: Config, step: int) -> None:
    """``train.eval_metrics`` of the EMA model (``eval/accuracy``, ``eval/cfid``, ``eval/fid`` in TensorBoard)."""
    if accelerator.is_main_process:
        from pipeline.evaluation import evaluate_for_training

        pipe = ConditionalDiffusionPipeline(unet=ema_unet(ema, unet), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        metrics = evaluate_for_training(pipe, evaluator, cfg.train.eval_per_class, cfg.sample, cfg.train.seed)
        accelerator.log(metrics, step=step)
    accelerator.wait_for_everyone()
