"""The training loop: Accelerate (DDP, bf16 autocast), diffusers EMA, TensorBoard, atomic checkpoints, resume.

Everything random in a step (noise, timesteps, label dropout, flips, dropout) is drawn from generators seeded
by ``(seed, step, micro-batch)``, and the noise of the whole global batch is drawn on every rank and sliced.
So a run is a pure function of its config: a resumed run repeats an uninterrupted one bit for bit, and
2 processes x batch B take the same step as 1 process x batch 2B.
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
from tqdm.auto import tqdm

from pipeline.checkpointing import EXIT_STOPPED_EARLY, StopSignal, replace_dir, resolve_resume, save_checkpoint
from pipeline.config import Config
from pipeline.data import ImageData, ImageDataset, flip_where, keep_batch, load_image_data, to_model_range
from pipeline.diffusion import diffusion_loss, make_sampler, make_train_scheduler
from pipeline.export import save_export
from pipeline.model_card import TrainingRecord
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline


@dataclass
class Progress:
    """The loop's own state, saved in every checkpoint next to model, EMA, optimizer and LR schedule."""

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
    """``save_pretrained`` into ``output_dir/pipeline`` through a temporary directory (never half-written), with the
    code that opens it in plain diffusers and, given ``record``, a model card (``pipeline.export``)."""
    final = output_dir / "pipeline"
    build = output_dir / ".tmp-pipeline"
    save_export(ConditionalDiffusionPipeline(unet=unet, scheduler=scheduler), build, record)
    replace_dir(build, final)
    return final


def train(cfg: Config, resume: str | None = None) -> int:
    """Run training to a stop condition. Returns 0 when the budget is done, 75 when stopped early with a
    checkpoint (signal or ``max_minutes``), so a job script knows whether to requeue."""
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
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = world * t.gradient_accumulation_steps
    if t.batch_size % per_step:
        raise ValueError(
            f"train.batch_size {t.batch_size} must be divisible by processes x accumulation steps = {per_step}; "
            f"use a multiple of {per_step}"
        )
    micro_batch = t.batch_size // per_step
    stop = StopSignal()

    data = load_image_data(cfg.data)
    if len(data) < t.batch_size:
        raise ValueError(f"the data set has {len(data)} images, fewer than train.batch_size {t.batch_size}")
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
        raise ValueError(f"train.lr_schedule {t.lr_schedule} needs a length: set train.max_steps or train.max_epochs")
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
    accelerator.register_for_checkpointing(ema, progress)

    checkpoint = resolve_resume(output_dir, resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {progress.step}")
    elif resume == "latest":
        accelerator.print(f"no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(output_dir / "config.yaml")
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
        torch.manual_seed(hash((t.seed, progress.step, micro, rank)) & 0x7FFF_FFFF)  # model dropout
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
    steps_since_log = 0
    grad_norm = None
    started = last_log = time.time()
    images_at_log = progress.images_seen
    stopped_early = False
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

            if step % t.log_every == 0:
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
            out_of_time = t.max_minutes is not None and (time.time() - started) / 60 >= t.max_minutes
            stop_now = stop.agreed(accelerator, out_of_time)
            if t.sample_every and step % t.sample_every == 0:
                log_samples(accelerator, ema, raw_unet, noise_scheduler, cfg, step, output_dir)
            if t.eval_every and step % t.eval_every == 0:
                log_metrics(accelerator, evaluator, ema, raw_unet, noise_scheduler, cfg, step)
            if finished or stop_now or (t.checkpoint_every and step % t.checkpoint_every == 0):
                save_checkpoint(accelerator, output_dir, step, t.keep_checkpoints)
            if finished or stop_now or (t.export_every and step % t.export_every == 0):
                record = TrainingRecord.of_this_process(cfg, step, progress.images_seen)
                export(accelerator, ema, raw_unet, noise_scheduler, output_dir, record)
            if finished or stop_now:
                done, stopped_early = True, not finished
                reason = stop.received or ("max_minutes" if out_of_time else None)
                if stopped_early:
                    accelerator.print(f"stopping early at step {step} ({reason}); checkpoint saved, resume with --resume latest")
                break
    bar.close()
    accelerator.end_training()
    if accelerator.is_main_process:
        write_status(output_dir, "stopped_early" if stopped_early else "finished", progress.step)
    return EXIT_STOPPED_EARLY if stopped_early else 0


def write_status(output_dir: Path, status: str, step: int) -> None:
    """``<output_dir>/status.json``: running, finished or stopped_early (resume to continue). Job scripts read it
    because ``accelerate launch`` reports any non-zero worker exit, 75 included, as 1."""
    tmp = output_dir / ".status.json.tmp"
    tmp.write_text(json.dumps({"status": status, "step": step}) + "\n")
    os.replace(tmp, output_dir / "status.json")


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
