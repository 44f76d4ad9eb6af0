"""Classifiers trained by the project on the diffusion model's own data set.

They answer the seed's question "does the conditioning control the content": the share of samples of class y
that the classifier calls y (conditional accuracy), and a Fréchet distance on their penultimate-layer features
(classifier-feature FID), which, unlike Inception's, knows what a digit or a CIFAR-10 class looks like.

- ``small_cnn`` (MNIST, 28x28x1): 4 convolutions, ~0.2 M parameters, >= 99 % test accuracy in 2 epochs (~3 min on 2 CPU cores).
- ``airbench`` (CIFAR-10, 32x32x3): the fast CIFAR-10 network of Jordan (2024, "94 % on CIFAR-10 in 3.29 seconds",
  a successor of the DAWNBench ResNet-9 of Page 2018): a frozen 2x2 patch-whitening convolution, three
  conv-pool-BatchNorm-GELU groups of 64/256/256 channels with identity-initialised filters, ~2 M parameters;
  trained with Nesterov SGD, label smoothing, flips and 2-px translations, and evaluated with flip test-time
  augmentation (``flip_tta``). >= 90 % test accuracy in ~10 epochs on 2 CPU cores (docs/evaluation.md).

Both take images (N, C, H, W) float in [0, 1], the ``output_type="pt"`` of the pipeline, and normalise inside.
Saved with ``save_pretrained`` (``config.json`` + safetensors) plus ``metrics.json`` (measured test accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pipeline.config import DataConfig
from pipeline.data import ImageData, flip_where, load_image_data, translate_where
from pipeline.errors import ConfigError
from pipeline.names import PROJECT_ROOT

COMMITTED = PROJECT_ROOT / "data" / "classifiers"
Arch = Literal["small_cnn", "airbench"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _FastBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale (only the shift learns) and fast running statistics (momentum 0.4)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU: (N, cin, H, W) -> (N, cout, H/2, W/2).
    Filters start as the identity on their first ``cin`` outputs (an implicit residual path)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = _FastBatchNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _FastBatchNorm(cout)
        for conv in (self.conv1, self.conv2):
            nn.init.dirac_(conv.weight.data[: conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class ImageClassifier(ModelMixin, ConfigMixin):
    """A CNN ``(N, C, H, W) in [0, 1] -> (N, num_classes)`` logits, with ``features`` -> (N, feature_dim).

    Args:
        arch: ``small_cnn`` or ``airbench`` (see the module docstring).
        in_channels, image_size, num_classes, class_names: of the data set it was trained on.
        mean, std: per-channel normalisation of the [0, 1] input (the training set's statistics).
        flip_tta: average the features of each image and its mirror image (test-time augmentation; in eval
            mode only), so logits, accuracy and classifier-FID all see the same flip-invariant features.
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
        flip_tta: bool = False,
    ):
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean and std need {in_channels} values each, got {len(mean)} and {len(std)}")
        self.register_buffer("_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.logit_scale = 1.0
        if arch == "small_cnn":
            self.body = nn.Sequential(
                _conv_bn(in_channels, 16), _conv_bn(16, 16), nn.MaxPool2d(2),
                _conv_bn(16, 32), _conv_bn(32, 32), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * (image_size // 4) ** 2, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
            )
            self.feature_dim = 128
            self.dropout = nn.Dropout(0.2)
            self.head = nn.Linear(self.feature_dim, num_classes)
        elif arch == "airbench":
            whitening = nn.Conv2d(in_channels, 2 * in_channels * 4, 2, bias=True)  # set from data by init_whitening
            whitening.weight.requires_grad_(False)
            self.body = nn.Sequential(
                whitening, nn.GELU(), _ConvGroup(whitening.out_channels, 64), _ConvGroup(64, 256), _ConvGroup(256, 256),
                nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            )
            self.feature_dim = 256
            self.dropout = nn.Identity()
            self.head = nn.Linear(self.feature_dim, num_classes, bias=False)
            self.logit_scale = 1 / 9  # small initial logits, as the recipe was tuned with
        else:
            raise ValueError(f"classifier arch {arch!r} unknown; use small_cnn or airbench")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, feature_dim) penultimate activations (the classifier-FID features)."""
        if images.shape[1:] != (self.config.in_channels, self.config.image_size, self.config.image_size):
            expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
            raise ValueError(f"classifier expects images (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        x = (images.to(self._mean.dtype) - self._mean) / self._std
        if self.config.flip_tta and not self.training:
            return (self.body(x) + self.body(x.flip(-1))) / 2
        return self.body(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, num_classes) logits."""
        return self.logits(self.features(images))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) features -> (N, num_classes) logits."""
        return self.head(self.dropout(features)) * self.logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the ``airbench`` first layer to whiten the 2x2 patches of ``images`` (N, C, H, W) in [0, 1]: its
        filters are the patch covariance's eigenvectors scaled by 1/sqrt(eigenvalue), each with its negation."""
        whitening = self.body[0]
        x = (images.float() - self._mean.cpu()) / self._std.cpu()
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * 4)
        values, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (vectors.T / torch.sqrt(values + eps)[:, None]).flip(0).reshape(-1, x.shape[1], 2, 2)
        whitening.weight.copy_(torch.cat([filters, -filters]))


class ClassifierNotFound(ConfigError, FileNotFoundError):
    """No classifier under the name or directory given: bad input (one line, exit 2), and a missing file."""


def classifier_dir(name: str | Path = "mnist") -> Path:
    """The directory of a classifier: ``name`` itself, else the committed one (``"mnist"`` = ``data/classifiers/mnist``)."""
    path = Path(name)
    if not path.is_dir():
        path = COMMITTED / str(name)
    if not (path / "config.json").is_file():
        known = sorted(p.name for p in COMMITTED.iterdir() if (p / "config.json").is_file()) if COMMITTED.is_dir() else []
        raise ClassifierNotFound(
            f"no classifier at {name!r}; committed ones: {', '.join(known) or 'none'}; "
            "train one with: python -m pipeline.evaluation classifier train --dataset DATA --out DIR"
        )
    return path


def load_classifier(name: str | Path = "mnist", device: str | torch.device | None = None) -> ImageClassifier:
    """A trained classifier in eval mode: a committed one by name (``"mnist"`` = ``data/classifiers/mnist``)
    or any directory written by ``train_classifier``."""
    path = classifier_dir(name)
    model = ImageClassifier.from_pretrained(str(path))
    return model.to(device or "cpu").eval()


@dataclass
class ClassifierTraining:
    """Options of ``train_classifier``; ``RECIPES`` holds the tuned ones per architecture.

    ``optimizer="sgd"`` uses Nesterov SGD in the decoupled form of the airbench recipe (Page 2018's "how to train
    your ResNet" parametrisation): ``lr`` and ``weight_decay`` are per 1024 examples and independent of the
    momentum and of each other, BatchNorm shifts learn ``bias_lr_scale`` times faster, and the learning rate
    follows a triangle (0.2 -> 1 at 23 % -> 0.07). ``optimizer="adamw"`` uses them as AdamW's, with one-cycle.
    """

    arch: Arch = "small_cnn"
    epochs: int = 2
    batch_size: int = 128
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    momentum: float = 0.85
    weight_decay: float = 5e-4
    bias_lr_scale: float = 1.0
    label_smoothing: float = 0.0
    translate: int = 2
    whitening_bias_epochs: int = 0
    seed: int = 0
    mixed_precision: Literal["no", "bf16"] = "bf16"


RECIPES: dict[str, ClassifierTraining] = {
    "small_cnn": ClassifierTraining(),
    "airbench": ClassifierTraining(
        arch="airbench", epochs=10, batch_size=1024, optimizer="sgd", lr=11.5, momentum=0.85, weight_decay=0.0153,
        bias_lr_scale=64.0, label_smoothing=0.2, translate=2, whitening_bias_epochs=3,
    ),
}


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool, translate: int) -> torch.Tensor:
    """Random translations by up to ``translate`` px (reflected borders for natural images, black, 0, for digits)
    and, with ``flip``, random horizontal flips. (N, C, H, W) float in [0, 1] -> same shape."""
    n = len(images)
    # the crop's corner in the padded image, drawn as before translate_where existed: a seed trains on the same images
    offset = torch.randint(0, 2 * translate + 1, (2, n), generator=generator)
    out = translate_where(images, translate - offset.T, translate, "reflect" if flip else 0.0)
    if flip:
        out = flip_where(out, torch.rand(n, generator=generator) < 0.5)
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


def _optimizer(model: ImageClassifier, options: ClassifierTraining, total_steps: int):
    """The optimizer and its per-step LR schedule for ``options``."""
    if options.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, options.lr, total_steps=total_steps, pct_start=0.25)
    # Nesterov steps are 1 + 1/(1 - momentum) times the gradient: divide it out so lr means the same at any momentum;
    # lr is per 1024 examples of a summed loss, and the loss here is a batch mean.
    per_step = 1024 * (1 + 1 / (1 - options.momentum))
    lr = options.lr * options.batch_size / per_step
    decay = options.weight_decay * options.batch_size / per_step
    shifts = [p for name, p in model.named_parameters() if "norm" in name and p.requires_grad]
    others = [p for name, p in model.named_parameters() if "norm" not in name and p.requires_grad]
    bias_lr = lr * options.bias_lr_scale
    optimizer = torch.optim.SGD(
        [dict(params=shifts, lr=bias_lr, weight_decay=decay / bias_lr), dict(params=others, lr=lr, weight_decay=decay / lr)],
        momentum=options.momentum, nesterov=True,
    )
    peak = int(0.23 * total_steps)

    def triangle(step: int) -> float:
        if step < peak:
            return 0.2 + 0.8 * step / peak
        return 1.0 - 0.93 * (step - peak) / max(total_steps - peak, 1)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, triangle)


def train_classifier(data_cfg: DataConfig, out: str | Path, device: str | None = None, **options: Any) -> dict[str, Any]:
    """Train on ``data_cfg`` (its split, default train), test on the ``test`` split, save to ``out``.

    ``options`` override fields of ``ClassifierTraining``; the recipe is ``RECIPES[options["arch"]]``, by default
    ``small_cnn`` for one-channel and ``airbench`` for three-channel images.
    Returns and writes ``out/metrics.json``: test accuracy, epochs, wall time, data set.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_data = load_image_data(data_cfg)
    test_data = load_image_data(DataConfig(dataset=data_cfg.dataset, split="test", image_column=data_cfg.image_column,
                                           label_column=data_cfg.label_column))
    arch = options.get("arch") or ("small_cnn" if train_data.channels == 1 else "airbench")
    options = dataclasses.replace(RECIPES[arch], **{k: v for k, v in options.items() if v is not None})
    torch.manual_seed(options.seed)
    pixels = train_data.images.float() / 255
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).tolist()
    natural = train_data.channels == 3  # flips suit natural images, not digits
    model = ImageClassifier(
        arch=options.arch, in_channels=train_data.channels, image_size=train_data.size, num_classes=len(train_data.class_names),
        class_names=train_data.class_names, mean=tuple(mean), std=tuple(std), flip_tta=natural,
    )
    if options.arch == "airbench":
        model.init_whitening(pixels[:5000])
    del pixels
    model.to(device, memory_format=torch.channels_last)  # 1.4x faster convolutions on CPU (oneDNN) and GPU
    steps_per_epoch = len(train_data) // options.batch_size
    optimizer, schedule = _optimizer(model, options, options.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(options.seed)
    started = time.time()
    for epoch in range(options.epochs):
        model.train()
        if options.whitening_bias_epochs:  # the whitening shift learns early, then freezes
            model.body[0].bias.requires_grad_(epoch < options.whitening_bias_epochs)
        order = torch.randperm(len(train_data), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * options.batch_size : (step + 1) * options.batch_size]
            images = augment(train_data.images[index].float() / 255, generator, natural, options.translate)
            images = images.to(device, memory_format=torch.channels_last)
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
    if not math.isfinite(total):
        raise RuntimeError(f"classifier training diverged (loss {total}); lower --lr")
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
