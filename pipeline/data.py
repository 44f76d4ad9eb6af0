"""Images and labels from Hugging Face ``datasets``: a hub id or a local path, decoded once into uint8 tensors.

A hub id (``ylecun/mnist``, ``uoft-cs/cifar10``), a directory of Parquet files or an imagefolder (both read by
``datasets.load_dataset``), or the output of ``Dataset.save_to_disk`` all give the same ``ImageData``. The
image and label columns are detected (the ``Image`` feature; a ``ClassLabel`` or ``label``) unless configured,
and the class names come from the ``ClassLabel`` feature.

The training augmentations (``flip_where``, ``translate_where``, ``cutout_where``) are pure tensor functions of
the images and of offsets drawn elsewhere (``pipeline.training.batches.StepDraws``), so the same draws give the same images on
any device, process count or resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.errors import ConfigError
from pipeline.names import PROJECT_ROOT


def resolve_dataset_path(dataset: str) -> str:
    """A path relative to the working directory, else to the project root (the embedded MNIST), else a hub id."""
    if Path(dataset).exists():
        return dataset
    in_project = PROJECT_ROOT / dataset
    if in_project.exists():
        return str(in_project)
    return dataset


@dataclass
class ImageData:
    """A decoded split: ``images`` (N, C, H, W) uint8, ``labels`` (N,) int64 in [0, len(class_names))."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]


class ImageDataset(torch.utils.data.Dataset):
    """Map-style view of ``ImageData`` whose batched fetch is one tensor gather (no per-item collation)."""

    def __init__(self, data: ImageData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.images[index], self.data.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.data.images[index], self.data.labels[index]


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_fn`` for ``ImageDataset``: ``__getitems__`` already returns a stacked batch."""
    return batch


def _open(dataset: str, split: str) -> datasets.Dataset:
    source = resolve_dataset_path(dataset)
    path = Path(source)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))  # Dataset.save_to_disk / DatasetDict.save_to_disk output
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ConfigError(f"split {split!r} not in {dataset!r}; available: {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset(source, split=split)
    except ConfigError:
        raise
    except ValueError as error:
        if "split" in str(error).lower() or "Unknown split" in str(error):
            raise ConfigError(f"data.split {split!r} not found in {dataset!r}: {error}") from None
        raise
    except OSError as error:  # FileNotFoundError, and the hub's connection errors
        raise ConfigError(
            f"data.dataset {dataset!r} is neither a local path nor a reachable hub data set ({type(error).__name__}); "
            "pass a local directory (Parquet files, an imagefolder or save_to_disk output), or a hub id that is "
            "reachable or already cached (with HF_HUB_OFFLINE=1 only the cache is read)"
        ) from None


def _columns(ds: datasets.Dataset, cfg: DataConfig) -> tuple[str, str]:
    features = ds.features
    names = list(features)
    images = [n for n, f in features.items() if isinstance(f, datasets.Image)]
    if cfg.image_column is not None:
        if cfg.image_column not in features:
            raise ConfigError(f"data.image_column {cfg.image_column!r} not in the data set; columns: {', '.join(names)}")
        if not isinstance(features[cfg.image_column], datasets.Image):
            raise ConfigError(
                f"data.image_column {cfg.image_column!r} is not an image column ({features[cfg.image_column]}); "
                f"image columns: {', '.join(images) or 'none'}"
            )
        image_column = cfg.image_column
    elif images:
        image_column = images[0]
    else:
        raise ConfigError(f"no image column found among {', '.join(names)}; set data.image_column")
    if cfg.label_column is not None:
        if cfg.label_column not in features:
            raise ConfigError(f"data.label_column {cfg.label_column!r} not in the data set; columns: {', '.join(names)}")
        label_column = cfg.label_column
    else:
        labels = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if not labels and "label" not in features:
            raise ConfigError(f"no label column found among {', '.join(names)}; set data.label_column")
        label_column = labels[0] if labels else "label"
    return image_column, label_column


def load_image_data(cfg: DataConfig) -> ImageData:
    """Decode the configured split into memory (MNIST train: ~3 s, 47 MB; CIFAR-10 train: 150 MB)."""
    ds = _open(cfg.dataset, cfg.split)
    image_column, label_column = _columns(ds, cfg)
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    label_feature = ds.features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
        labels = np.asarray(ds[label_column], dtype=np.int64)
    else:
        values = ds[label_column]
        if not all(isinstance(v, (int, np.integer)) for v in values[:100]):
            raise ConfigError(f"label column {label_column!r} must hold class indices or be a ClassLabel")
        labels = np.asarray(values, dtype=np.int64)
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        bad = int(((labels < 0) | (labels >= len(class_names))).sum())
        raise ConfigError(f"{bad} labels in {label_column!r} are outside 0..{len(class_names) - 1} (e.g. -1 for "
                          "'no label'); drop those rows from the data set, or set data.label_column")
    images = _decode(ds, image_column)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), class_names)


def _decode(ds: datasets.Dataset, column: str) -> np.ndarray:
    arrays = ds.select_columns([column]).with_format("numpy")[:][column]
    if arrays.dtype == object:  # images of mixed sizes or modes
        shapes = {a.shape for a in arrays}
        raise ConfigError(f"images in {column!r} differ in size or mode ({sorted(shapes)[:3]}...); resize them to one size first")
    if arrays.ndim == 3:
        arrays = arrays[:, None]
    else:
        arrays = arrays.transpose(0, 3, 1, 2)
    if arrays.shape[-1] != arrays.shape[-2]:
        raise ConfigError(f"images must be square, got {arrays.shape[-2]}x{arrays.shape[-1]}")
    return np.ascontiguousarray(arrays.astype(np.uint8))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images with those where the (B,) bool ``flip`` is set mirrored left-right."""
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def translate_where(images: torch.Tensor, shifts: torch.Tensor, max_shift: int, border: float | Literal["reflect"]) -> torch.Tensor:
    """(B, C, H, W) images, each moved by its row (down, right) of the (B, 2) integer ``shifts``, all within
    [-max_shift, max_shift]: ``out[b, :, y, x] = images[b, :, y - down, x - right]`` (pad and crop back to size,
    the random crops of the seed and of the classifiers' training). The uncovered border is ``border``: a
    constant, or ``"reflect"``, the image mirrored at its edge (needs ``max_shift`` < H and W). One gather for
    the batch, with no host sync, so it runs on the device inside the training step."""
    batch, channels, height, width = images.shape
    padding = (max_shift,) * 4
    padded = F.pad(images, padding, mode="reflect") if border == "reflect" else F.pad(images, padding, value=border)
    # out[y] = padded[y + max_shift - down]: the window of the padded image each image is cropped from
    rows = torch.arange(height, device=images.device) + (max_shift - shifts[:, :1])  # (B, H)
    cols = torch.arange(width, device=images.device) + (max_shift - shifts[:, 1:])  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]


def translation_border(channels: int, black: float) -> float | Literal["reflect"]:
    """The ``border`` of ``translate_where`` for images with ``channels`` and ``black`` in their range. Grayscale
    (MNIST, Fashion-MNIST) gets black, their background, so the fill is exact; colour photographs (CIFAR-10) are
    mirrored at the edge, as the project's CIFAR-10 classifier trains, because a black band is an edge no
    photograph has, and a generative model learns the augmented images' distribution, bands included."""
    return black if channels == 1 else "reflect"


def cutout_where(images: torch.Tensor, centers: torch.Tensor, size: int, value: float = 0.0) -> torch.Tensor:
    """(B, C, H, W) images with, in each, the ``size`` x ``size`` square centred on its row (row, column) of the
    (B, 2) integer ``centers`` set to ``value`` in every channel (Cutout, DeVries & Taylor 2017). The square
    spans rows ``row - size // 2`` to ``row - size // 2 + size - 1`` (columns alike) and is clipped at the
    border, so a centre near an edge blanks less, as in the paper, whose centres are uniform over the image."""
    height, width = images.shape[-2:]
    first = centers - size // 2  # (B, 2): the square's first row and column, possibly outside the image
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    in_rows = (rows >= first[:, :1]) & (rows < first[:, :1] + size)  # (B, H)
    in_cols = (cols >= first[:, 1:]) & (cols < first[:, 1:] + size)  # (B, W)
    return images.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], value)


def check_augmentation(cfg: DataConfig, size: int) -> None:
    """ConfigError where ``data.translate`` or ``data.cutout`` does not fit images of ``size`` px, which is known
    only once the data set is loaded (``pipeline.config.validate`` checks that both are >= 0)."""
    if 2 * cfg.translate >= size:
        raise ConfigError(f"data.translate {cfg.translate} must be less than half the image size ({size} px); "
                          f"use at most {(size - 1) // 2}")
    if cfg.cutout > size:
        raise ConfigError(f"data.cutout {cfg.cutout} must be at most the image size ({size} px); use at most {size}")
