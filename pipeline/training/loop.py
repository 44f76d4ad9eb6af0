"""The training loop: ``train`` reads top to bottom, one commented block per phase; ``train_step`` is one micro-batch.

Everything random in a step (noise, timesteps, label dropout, flips, translations, Cutout squares, dropout
masks) is drawn for the whole global batch from generators seeded by ``(seed, step)`` on every rank, and each
micro-batch takes its rows. So a run is a pure function of its config: a resumed run repeats an uninterrupted
one bit for bit, and 2 processes x batch B take the same step as 1 process x batch 2B, dropout included.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from pipeline.checkpointing import CONFIG_FILE, Progress, resolve_resume
from pipeline.config import Config, load_config
from pipeline.data import check_augmentation, cutout_where, flip_where, load_image_data, to_model_range, translate_where, translation_border
from pipeline.diffusion import diffusion_loss, make_train_scheduler, student_sampler
from pipeline.distillation import distillation_loss
from pipeline.models.build import build_unet, load_teacher, parameter_groups
from pipeline.models.unet import ConditionalUNet
from pipeline.run_dir import claim
from pipeline.training.batches import StepDraws, endless_batches, make_loader
from pipeline.training.hooks import checkpoint, export, log_metrics, log_samples, make_evaluator
from pipeline.training.monitoring import FiniteGuard, Meter, due, finish, report_divergence, saves_due, stop_request
from pipeline.training.resume import resume_changes, resume_from
from pipeline.training.start import claim_output_dir, hold_output_dir, make_accelerator, micro_batch_size, start_logs, step_budget
from pipeline.training.state import TrainingState


def train_step(state: TrainingState, cfg: Config, draws: StepDraws, micro: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One micro-batch, (B, C, H, W) uint8 ``images`` and (B,) ``labels``: noise the images at random timesteps,
    predict with ``state.model`` (``state.unet`` as it trains), backprop. Returns the loss, detached. A distilled
    student learns from ``state.teacher`` instead (``distillation.distillation_loss``; its labels are never dropped).

    The optimizer step's ``draws`` cover its whole global batch on every rank: micro-batch ``micro`` of rank r holds
    global batch positions (micro * world + r) * B..., as Accelerate deals batches round-robin.
    """
    accelerator, unet, noise_scheduler = state.accelerator, state.unet, state.noise_scheduler
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
    unet.set_dropout_rows(draws.dropout_seed, mine, cfg.train.batch_size)
    if state.teacher is not None:
        with accelerator.autocast():
            loss = distillation_loss(state.model, state.teacher, clean, labels, noise, timesteps, draws.guidance[mine],
                                     state.sampler, cfg)
    else:
        if unet.null_class is not None:
            labels = torch.where(drop, unet.null_class, labels)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        if cfg.train.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            prediction = state.model(noisy, timesteps, labels).sample
        loss = diffusion_loss(prediction, clean, noise, noisy, timesteps, noise_scheduler, cfg.diffusion)
    accelerator.backward(loss)
    return loss.detach()


def train(cfg: Config, resume: str | None = None) -> int:
    """Run training to a stop condition. Returns 0 when the budget is done, 75 when stopped early with a
    checkpoint (signal or ``max_minutes``), so a job script knows whether to requeue, 3 when it diverged."""
    output_dir = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train)
    with hold_output_dir(accelerator, output_dir) as stop:
        # Split the global batch, find the checkpoint to resume from and check its config and the output directory.
        micro_batch = micro_batch_size(accelerator, cfg.train)
        checkpoint_path = resolve_resume(output_dir, resume, accelerator.print)
        changes = resume_changes(load_config(checkpoint_path / CONFIG_FILE), cfg) if checkpoint_path else []
        claim(output_dir, checkpoint_path, cfg.train.overwrite, move=False)

        # Load the data; build the U-Net (seeded: every rank starts alike), its optimizer and LR schedule. A distilled
        # student starts from its frozen teacher's weights and samples with its own sampler.
        data = load_image_data(cfg.data)
        check_augmentation(cfg.data, data.size)
        loader = make_loader(data, micro_batch, cfg.train.seed, cfg.train.batch_size)
        torch.manual_seed(cfg.train.seed)
        unet = build_unet(cfg, data.size, data.channels, data.class_names)
        noise_scheduler = make_train_scheduler(cfg.diffusion, cfg.model.learned_variance)
        teacher, sampler = None, noise_scheduler
        if cfg.distill.teacher is not None:
            teacher = load_teacher(cfg, unet, noise_scheduler).to(accelerator.device)
            sampler = student_sampler(cfg.sample, cfg.distill, noise_scheduler.config)
        if cfg.train.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(parameter_groups(unet, cfg), lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
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
        state = TrainingState(accelerator, model, unet, ema, noise_scheduler, optimizer, lr_scheduler, Progress(), sampler, teacher)
        progress = state.progress

        # Resume weights, optimizer, LR schedule, RNG, EMA and progress from the checkpoint, with this start's settings;
        # build the evaluator. The start is good: claim the output directory and record the start (config, status,
        # TensorBoard). Bad input up to here left the output directory as it was (hold_output_dir).
        resume_from(state, cfg, checkpoint_path, resume, changes)
        evaluator = make_evaluator(accelerator, cfg)
        claim_output_dir(accelerator, output_dir, checkpoint_path, cfg.train.overwrite)
        start_logs(state, cfg, micro_batch, steps_per_epoch)

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
                    meter.add(train_step(state, cfg, draws, micro, images, labels))
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
            if due(progress.step, cfg.train.log_every):
                meter.log(state, steps_per_epoch)

            # Agree across processes on stopping and on finite weights: a host sync, so only when a log or save is due.
            stop_reason = "finished" if progress.reached(max_steps) else None
            if not (stop_reason or due(progress.step, cfg.train.log_every) or saves_due(progress.step, cfg.train)):
                continue
            guard.record(progress.step, [*unet.parameters(), *ema.shadow_params])
            stop_reason = guard.agree(accelerator, stop_reason or stop_request(stop, meter, cfg.train.max_minutes))
            if stop_reason == "diverged":
                report_divergence(accelerator, output_dir, guard.bad_step)
                break

            # Sample and evaluate the EMA model when due; checkpoint and export it when due and before stopping.
            if due(progress.step, cfg.train.sample_every):
                log_samples(state, cfg)
            if due(progress.step, cfg.train.eval_every):
                log_metrics(state, cfg, evaluator)
            if stop_reason or due(progress.step, cfg.train.checkpoint_every):
                checkpoint(state, cfg)
            if stop_reason or due(progress.step, cfg.train.export_every):
                export(state, cfg)

        # A run that ends at its budget leaves the final step's export: a resume at the budget (killed during the final
        # export, say) writes it if pipeline/ is missing or older, so `finished` always comes with the final export.
        if stop_reason == "finished":
            export(state, cfg, unless_current=True)

        # Close the logs, then record how the run ended for job scripts.
        meter.bar.close()
        accelerator.end_training()
        return finish(accelerator, output_dir, stop_reason, progress.step)
