"""What each optimizer step trains on: the order of the images, the micro-batches of this rank, and the step's draws.

The order of an epoch is a function of (seed, epoch) and the draws of a step a function of (seed, step), both for
the whole global batch: a resumed run repeats an uninterrupted one bit for bit, and the process count does not
change what a step sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from pipeline.data import ImageData, ImageDataset, keep_batch
from pipeline.errors import ConfigError


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


@dataclass
class StepDraws:
    """The random draws of one optimizer step for its whole global batch: noise (B, C, H, W), timesteps (B,),
    label dropout (B,), horizontal flips (B,), translations (B, 2) in [-translate, translate] (down, right),
    Cutout centres (B, 2) in [0, size) (row, column), a distilled student's guidance scales as uniforms (B,) in [0, 1)
    (``distillation.guidance_scales``) and the seed of the dropout masks, a function of (seed, step, translate) alone."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    drop: torch.Tensor
    flip: torch.Tensor
    shifts: torch.Tensor
    centers: torch.Tensor
    guidance: torch.Tensor
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
        guidance = torch.rand(batch, generator=g, device=device)  # after the augmentations' draws, for the same reason
        return cls(noise, timesteps, drop, flip, shifts, centers, guidance, dropout_seed=hash((seed, step, 1)))
