"""What the loop does with the model when due: checkpoint it, export, sample and evaluate its EMA copy.

Each hook takes the run's ``TrainingState`` and config; sampling, evaluation and export run on the main process
while the others wait, so every rank leaves a hook at the same point.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from pipeline.checkpointing import save_checkpoint, save_loop_state
from pipeline.config import Config
from pipeline.export import export_pipeline, exported_step
from pipeline.model_card import TrainingRecord, in_training_reference
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.run_dir import grid_path
from pipeline.sampling import sample_images
from pipeline.training.state import TrainingState

if TYPE_CHECKING:  # imported when evaluation is asked for: it loads the data set's classifier
    from pipeline.evaluation import Evaluator


def make_evaluator(accelerator: Accelerator, cfg: Config) -> Evaluator | None:
    """The main process's ``Evaluator`` when ``train.eval_every`` is set, else None. Built at start: a data set
    without a classifier (for accuracy, cfid) fails now, not at the first evaluation."""
    if not (cfg.train.eval_every and accelerator.is_main_process):
        return None
    from pipeline.evaluation import Evaluator  # loads the data set's classifier

    # distances to (up to 10,000 of) the images it trains on, as the model card states; cached after the first evaluation
    return Evaluator(cfg.data.dataset, metrics=cfg.train.eval_metrics, reference=in_training_reference(cfg.data),
                     device=accelerator.device)


def ema_unet(ema: EMAModel, unet: ConditionalUNet) -> ConditionalUNet:
    """A copy of ``unet`` carrying the EMA weights, in eval mode."""
    copy = ConditionalUNet.from_config(unet.config).to(unet.device)
    ema.copy_to(copy.parameters())
    return copy.eval()


def checkpoint(state: TrainingState, cfg: Config) -> None:
    """Every state of the run at this step as ``<output_dir>/checkpoints/step_N``, atomically; older ones pruned."""
    save_checkpoint(state.accelerator, Path(cfg.train.output_dir), state.progress.step, cfg.train.keep_checkpoints,
                    lambda directory: save_loop_state(directory, state.ema, state.progress, cfg))


def export(state: TrainingState, cfg: Config, unless_current: bool = False) -> None:
    """The EMA model as ``<output_dir>/pipeline``, with its model card; with ``unless_current``, only if
    ``pipeline/`` does not hold this step already (``training.json``)."""
    accelerator, output_dir = state.accelerator, Path(cfg.train.output_dir)
    if accelerator.is_main_process and not (unless_current and exported_step(output_dir / "pipeline") == state.progress.step):
        accelerator.get_tracker("tensorboard", unwrap=True).flush()  # the model card reads the last eval/* metrics
        record = TrainingRecord.of_this_process(cfg, state.progress.step, state.progress.images_seen)
        export_pipeline(ema_unet(state.ema, state.unet), state.sampler, output_dir, record)
    accelerator.wait_for_everyone()


@torch.no_grad()
def log_samples(state: TrainingState, cfg: Config, per_class: int = 8) -> None:
    """One row per class from the EMA model into TensorBoard (``samples``) and ``samples/step_N.png``."""
    accelerator, step, output_dir = state.accelerator, state.progress.step, Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        pipe = ConditionalDiffusionPipeline(unet=ema_unet(state.ema, state.unet), scheduler=state.sampler)
        with accelerator.autocast():  # bf16 sampling is 2x faster on CPU at the same accuracy (docs/performance.md)
            images = sample_images(pipe, cfg.sample, list(range(state.unet.config.num_classes)), cfg.train.seed,
                                   num_images_per_label=per_class, output_type="pt").images
        grid = torchvision.utils.make_grid(images, nrow=per_class, padding=1)
        accelerator.get_tracker("tensorboard").log_images({"samples": grid[None].numpy()}, step=step)
        path = grid_path(output_dir, step)
        path.parent.mkdir(exist_ok=True)
        torchvision.utils.save_image(grid, path)
    accelerator.wait_for_everyone()


@torch.no_grad()
def log_metrics(state: TrainingState, cfg: Config, evaluator: Evaluator) -> None:
    """``train.eval_metrics`` of the EMA model (``eval/accuracy``, ``eval/cfid``, ``eval/fid`` in TensorBoard)."""
    accelerator = state.accelerator
    if accelerator.is_main_process:
        from pipeline.evaluation import evaluate_for_training

        pipe = ConditionalDiffusionPipeline(unet=ema_unet(state.ema, state.unet), scheduler=state.sampler)
        metrics = evaluate_for_training(pipe, evaluator, cfg.train.eval_per_class, cfg.sample, cfg.train.seed)
        accelerator.log(metrics, step=state.progress.step)
    accelerator.wait_for_everyone()
