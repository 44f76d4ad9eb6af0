"""Classifiers trained by the project on the diffusion model's own data set.

They answer the seed's question "does the conditioning control the content": the share of samples of class y
that the classifier calls y (conditional accuracy), and a Fréchet distance on their penultimate-layer features
(classifier-feature FID), which, unlike Inception's, knows what a digit is.

- ``small_cnn`` (MNIST, 28x28x1): 4 convolutions, ~0.2 M parameters, >= 99 % test accuracy in 2 epochs (~3 min on 2 CPU cores).
- ``resnet`` (CIFAR-10, 32x32x3): the ResNet-9 of the DAWNBench entries (Page 2018), ~6.6 M parameters,
  >= 90 % test accuracy after ~20 epochs on a GPU (hours on a CPU).

Both take images (N, C, H, W) float in [0, 1], the ``output_type="pt"`` of the pipeline, and normalise inside.
Saved with ``save_pretrained`` (``config.json`` + safetensors) plus ``metrics.json`` (measured test accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pipeline.config import PROJECT_ROOT, DataConfig
from pipeline.data import ImageData, load_image_data

COMMITTED = PROJECT_ROOT / "data" / "classifiers"
Arch = Literal["small_cnn", "resnet"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ImageClassifier(ModelMixin, ConfigMixin):
    """A CNN ``(N, C, H, W) in [0, 1] -> (N, num_classes)`` logits, with ``features`` -> (N, feature_dim).

    Args:
        arch: ``small_cnn`` or ``resnet`` (see the module docstring).
        in_channels, image_size, num_classes, class_names: of the data set it was trained on.
        mean, std: per-channel normalisation of the [0, 1] input (the training set's statistics).
    """

    @register_to_config
    def __init__(
        self,
        arch: Arch = "small_cnn",
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
    ):
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean and std need {in_channels} values each, got {len(mean)} and {len(std)}")
        self.register_buffer("_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        if arch == "small_cnn":
            self.body = nn.Sequential(
                _conv_bn(in_channels, 16), _conv_bn(16, 16), nn.MaxPool2d(2),
                _conv_bn(16, 32), _conv_bn(32, 32), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * (image_size // 4) ** 2, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
            )
            self.feature_dim = 128
        elif arch == "resnet":
            self.body = nn.Sequential(
                _conv_bn(in_channels, 64), _conv_bn(64, 128), nn.MaxPool2d(2), _Residual(128),
                _conv_bn(128, 256), nn.MaxPool2d(2),
                _conv_bn(256, 512), nn.MaxPool2d(2), _Residual(512),
                nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            )
            self.feature_dim = 512
        else:
            raise ValueError(f"classifier arch {arch!r} unknown; use small_cnn or resnet")
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, feature_dim) penultimate activations (the classifier-FID features)."""
        if images.shape[1:] != (self.config.in_channels, self.config.image_size, self.config.image_size):
            expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
            raise ValueError(f"classifier expects images (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        return self.body((images.to(self._mean.dtype) - self._mean) / self._std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, num_classes) logits."""
        return self.head(self.dropout(self.features(images)))


def load_classifier(name: str | Path = "mnist", device: str | torch.device | None = None) -> ImageClassifier:
    """A trained classifier in eval mode: a committed one by name (``"mnist"`` = ``data/classifiers/mnist``)
    or any directory written by ``train_classifier``."""
    path = Path(name)
    if not path.is_dir():
        path = COMMITTED / str(name)
    if not (path / "config.json").is_file():
        known = sorted(p.name for p in COMMITTED.iterdir() if (p / "config.json").is_file()) if COMMITTED.is_dir() else []
        raise FileNotFoundError(
            f"no classifier at {name!r}; committed ones: {', '.join(known) or 'none'}; "
            "train one with: python -m pipeline.evaluation classifier train --dataset DATA --out DIR"
        )
    model = ImageClassifier.from_pretrained(str(path))
    return model.to(device or "cpu").eval()


@dataclass
class ClassifierTraining:
    """Options of ``train_classifier``; the defaults suit MNIST on a CPU."""

    arch: Arch = "small_cnn"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    seed: int = 0
    mixed_precision: Literal["no", "bf16"] = "bf16"


RECIPES: dict[str, ClassifierTraining] = {
    "small_cnn": ClassifierTraining(),
    "resnet": ClassifierTraining(arch="resnet", epochs=24, batch_size=512, lr=4e-3, weight_decay=5e-4, label_smoothing=0.2),
}


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random translations by up to 2 px (MNIST) or 4 px (32x32) with zero padding, and optional flips.

    (N, C, H, W) float -> same shape.
    """
    n, _, h, w = images.shape
    pad = 2 if h <= 28 else 4
    padded = F.pad(images, (pad, pad, pad, pad))
    dx, dy = (torch.randint(0, 2 * pad + 1, (2, n), generator=generator)).tolist()
    out = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (x, y) in enumerate(zip(dx, dy, strict=True))])
    if flip:
        flips = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


@torch.no_grad()
def accuracy(classifier: ImageClassifier, data: ImageData, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``classifier`` on uint8 ``data`` (N, C, H, W)."""
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device).float() / 255
        correct += (classifier(images).argmax(1).cpu() == data.labels[start : start + batch_size]).sum().item()
    return correct / len(data)


def train_classifier(data_cfg: DataConfig, out: str | Path, device: str | None = None, **options: Any) -> dict[str, Any]:
    """Train on ``data_cfg`` (its split, default train), test on the ``test`` split, save to ``out``.

    ``options`` override fields of ``ClassifierTraining``; the recipe is ``RECIPES[options["arch"]]``, by default
    ``small_cnn`` for one-channel and ``resnet`` for three-channel images.
    Returns and writes ``out/metrics.json``: test accuracy, epochs, wall time, data set.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_data = load_image_data(data_cfg)
    test_data = load_image_data(DataConfig(dataset=data_cfg.dataset, split="test", image_column=data_cfg.image_column,
                                           label_column=data_cfg.label_column))
    arch = options.get("arch") or ("small_cnn" if train_data.channels == 1 else "resnet")
    options = dataclasses.replace(RECIPES[arch], **{k: v for k, v in options.items() if v is not None})
    torch.manual_seed(options.seed)
    pixels = train_data.images.float() / 255
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).tolist()
    del pixels
    model = ImageClassifier(
        arch=options.arch, in_channels=train_data.channels, image_size=train_data.size,
        num_classes=len(train_data.class_names), class_names=train_data.class_names, mean=tuple(mean), std=tuple(std),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = len(train_data) // options.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, options.lr, total_steps=options.epochs * steps_per_epoch, pct_start=0.25)
    generator = torch.Generator().manual_seed(options.seed)
    flip = train_data.channels == 3  # horizontal flips suit natural images, not digits
    started = time.time()
    for epoch in range(options.epochs):
        model.train()
        order = torch.randperm(len(train_data), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * options.batch_size : (step + 1) * options.batch_size]
            images = augment(train_data.images[index].float() / 255, generator, flip).to(device)
            labels = train_data.labels[index].to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=options.mixed_precision == "bf16"):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=options.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        test_accuracy = accuracy(model, test_data)
        print(f"epoch {epoch + 1}/{options.epochs}: loss {total / steps_per_epoch:.4f} test accuracy {test_accuracy:.4f} "
              f"({time.time() - started:.0f} s)", flush=True)
    metrics = {
        "test_accuracy": test_accuracy,
        "test_images": len(test_data),
        "train_images": len(train_data),
        "epochs": options.epochs,
        "wall_s": round(time.time() - started, 1),
        "device": str(device),
        "dataset": data_cfg.dataset,
        "options": dataclasses.asdict(options),
    }
    out = Path(out)
    model.cpu().eval().save_pretrained(str(out))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

