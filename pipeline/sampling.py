"""Sampling a trained pipeline: one call for "this sampler, these steps, this guidance, quietly", and class-balanced
sample sets in batches over any number of processes, for training, evaluation, figures, the demo and benchmarks.

In ``generate``, batch b of the label list always uses the noise of ``seed`` and b, whichever process draws it, so
the same command gives the same images with 1 process or with ``accelerate launch --num_processes 8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from pipeline.config import Config, SampleConfig, load_config
from pipeline.diffusion import make_sampler
from pipeline.names import SAMPLING_PRECISIONS
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline, ConditionalPipelineOutput, Labels
from pipeline.sample_flags import run_config_file


@dataclass
class Samples:
    """``images`` (N, C, H, W) uint8 (quantised as a saved PNG would be), ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] -> uint8, rounded."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def sample_images(pipe: ConditionalDiffusionPipeline, settings: SampleConfig, class_labels: Labels, seed: int,
                  **options: Any) -> ConditionalPipelineOutput:
    """``pipe``'s U-Net sampled with the sampler, steps and guidance (scale, interval, ramp) of ``settings``, without a
    progress bar, from ``torch.Generator(pipe.device).manual_seed(seed)``; ``pipe`` itself is untouched. ``options`` go
    to the pipeline's call (``num_images_per_label``, ``output_type``, ``return_intermediates``, ...). Guidance other
    than 1 on a model trained without a null class is the pipeline's ValueError."""
    sampling = ConditionalDiffusionPipeline(unet=pipe.unet, scheduler=make_sampler(settings.sampler, dict(pipe.scheduler.config)))
    sampling.set_progress_bar_config(disable=True)
    return sampling(class_labels=class_labels, guidance_scale=settings.guidance_scale, num_inference_steps=settings.num_inference_steps,
                    generator=torch.Generator(pipe.device).manual_seed(seed), guidance_interval=settings.guidance_interval,
                    guidance_ramp=settings.guidance_ramp, **options)


def saved_run_config(pipeline_dir: str | Path | None, config: str | Path | None = None) -> Config:
    """``config``, else the ``config.yaml`` inside ``pipeline_dir`` (a published pipeline) or the one a training run
    wrote beside it, else the defaults."""
    if config:
        return load_config(config)
    if pipeline_dir and (path := run_config_file(pipeline_dir)):
        return load_config(path)
    return Config()


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """(num_classes * per_class,) = 0,0,..,1,1,..: ``per_class`` of each class, in class order."""
    return torch.arange(num_classes).repeat_interleave(per_class)


Precision = Literal[SAMPLING_PRECISIONS]  # type: ignore[valid-type]


def sampling_batch(device: torch.device) -> int:
    """Images per sampling chunk: on a CPU moderate chunks are fastest (bf16, 5 M-parameter CIFAR-10 U-Net: 0.318,
    0.289, 0.278, 0.292 s per image at 10, 25, 50, 100; bench/sampling.py --chunks); a GPU wants large ones."""
    return 250 if device.type == "cuda" else 50


@torch.no_grad()
def generate(
    pipe: ConditionalDiffusionPipeline,
    per_class: int,
    sample: SampleConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    mixed_precision: Precision = "auto",
    state: PartialState | None = None,
) -> Samples:
    """``per_class`` images of every class with ``sample``'s sampler, steps and guidance.

    ``batch_size`` (images per chunk) and ``mixed_precision`` (the pipeline call's) default to the fastest for the
    device (``sampling_batch``; ``"auto"``: bf16 autocast where the hardware has it).
    With ``state`` of several processes (``accelerate launch``),
    every process must call this: the batches are dealt round-robin and gathered, so each returns the whole set.
    Without ``state`` this process draws every batch alone (what a training loop's main process wants).
    """
    sample = sample or SampleConfig()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    labels = class_labels(pipe.unet.config.num_classes, per_class)
    device = pipe.device
    batches = list(torch.split(torch.arange(len(labels)), batch_size or sampling_batch(device)))
    mine = []
    for b in range(rank, len(batches), world):
        images = sample_images(pipe, sample, labels[batches[b]], seed * 1_000_003 + b, output_type="pt",
                               mixed_precision=mixed_precision).images
        mine.append((b, to_uint8(images)))
    if world > 1:
        mine = gather_object(mine)
    ordered = [images for _, images in sorted(mine, key=lambda item: item[0])]
    return Samples(torch.cat(ordered), labels)
