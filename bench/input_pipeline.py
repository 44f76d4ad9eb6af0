"""Input pipeline: images/s the data loader delivers against images/s the model trains, and against the usual
Hugging Face ``datasets`` + torchvision recipe (diffusers' ``train_unconditional.py``: ``with_transform``,
PIL decode and ``ToTensor``/``Normalize`` per image, ``DataLoader(shuffle=True)``).

    python bench/input_pipeline.py                          # MNIST (embedded) and CIFAR-10 (../shared/data)
    python bench/input_pipeline.py --datasets data/mnist --batches 50

Ours is exactly what training iterates (``pipeline.training.batches.make_loader`` over the decoded uint8 cache), plus
the per-batch work done before the model (scale to [-1, 1], random flips where the config asks). The model
column is our U-Net's bf16 training step at the same shape (``bench/train_throughput.py``'s measurement).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bench.train_throughput import measure, ours
from pipeline.config import DataConfig
from pipeline.data import flip_where, load_image_data, to_model_range
from pipeline.names import PROJECT_ROOT
from pipeline.training.batches import make_loader

SHARED = Path(os.environ.get("SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def images_per_s(batches, count: int, prepare) -> float:
    """Images/s of drawing ``count`` batches from the iterable ``batches`` and applying ``prepare`` to each."""
    iterator = iter(batches)
    prepare(next(iterator))  # the first batch pays one-time costs (workers starting, caches)
    started, images = time.perf_counter(), 0
    for _ in range(count):
        images += len(prepare(next(iterator)))
    return images / (time.perf_counter() - started)


def ours_rate(data, batch: int, count: int, flip: bool) -> float:
    def prepare(batch_):
        images = to_model_range(batch_[0])
        if flip:
            images = flip_where(images, torch.rand(len(images)) < 0.5)
        return images

    return images_per_s(make_loader(data, batch, seed=0, global_batch=batch), count, prepare)


def torchvision_rate(dataset: str, batch: int, count: int, flip: bool, workers: int) -> float:
    import datasets
    from torchvision import transforms

    ds = datasets.load_dataset(dataset, split="train")
    image_column = "img" if "img" in ds.column_names else "image"
    steps = [transforms.RandomHorizontalFlip()] if flip else []
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    ds = ds.with_transform(lambda rows: {"images": [transform(image) for image in rows[image_column]], "label": rows["label"]})
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers,
        collate_fn=lambda rows: torch.stack([row["images"] for row in rows]),
    )
    return images_per_s(loader, count, lambda images: images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=f"data/mnist,{SHARED / 'cifar10'}")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per loader")
    parser.add_argument("--model-seconds", type=float, default=10.0)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch {args.batch}, {args.batches} timed batches")
    print("| data set | decode once (s) | ours: cache + gather | HF datasets + torchvision, 0 workers | same, 2 workers | "
          "ours / torchvision (0 workers) | our U-Net bf16 training step | ours / model |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        shape = "cifar10" if "cifar" in dataset else "mnist"
        flip = shape == "cifar10"
        started = time.perf_counter()
        data = load_image_data(DataConfig(dataset=dataset))
        decode_s = time.perf_counter() - started
        mine = ours_rate(data, args.batch, args.batches, flip)
        peer0 = torchvision_rate(dataset, args.batch, args.batches, flip, workers=0)
        peer2 = torchvision_rate(dataset, args.batch, args.batches, flip, workers=2)
        model = measure(ours(shape, []), shape, args.batch, args.model_seconds, bf16=True, device=torch.device("cpu"))["images_per_s"]
        print(f"| {Path(dataset).name} ({len(data)} images) | {decode_s:.1f} | {mine:,.0f} img/s | {peer0:,.0f} img/s | "
              f"{peer2:,.0f} img/s | {mine / peer0:,.0f}x | {model:,.1f} img/s | {mine / model:,.0f}x |", flush=True)


if __name__ == "__main__":
    main()
