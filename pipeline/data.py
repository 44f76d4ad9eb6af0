"""Images and labels from Hugging Face ``datasets``: a hub id or a local path, decoded once into uint8 tensors.

A hub id (``ylecun/mnist``, ``uoft-cs/cifar10``), a directory of Parquet files or an imagefolder (both read by
``datasets.load_dataset``), or the output of ``Dataset.save_to_disk`` all give the same ``ImageData``. The
image and label columns are detected (the ``Image`` feature; a ``ClassLabel`` or ``label``) unless configured,
and the class names come from the ``ClassLabel`` feature (integer labels: ``data.num_classes``, or inferred as
its help says). Every image is scaled to 8 bits from its own depth (16-bit: round(x / 257); 1-bit: 0/255; palette:
its colours); a mode without a fixed range (32-bit float) is refused, as are empty data sets and missing labels.

The training augmentations (``flip_where``, ``translate_where``, ``cutout_where``) are pure tensor functions of
the images and of offsets drawn elsewhere (``pipeline.training.batches.StepDraws``), so the same draws give the same images on
any device, process count or resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from datasets.data_files import EmptyDatasetError

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
        if path.is_dir() and (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: a folder per split
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            if split not in splits:
                raise ConfigError(f"split {split!r} not in {dataset!r}; available: {', '.join(splits)}")
            path = path / split
        if path.is_dir() and (path / "state.json").exists():  # Dataset.save_to_disk
            if not json.loads((path / "state.json").read_text()).get("_data_files"):  # no shard, which datasets cannot open
                raise _no_rows(dataset, split)
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(source, split=split)
    except ConfigError:
        raise
    except EmptyDatasetError:  # an existing directory (or hub repository) without a file datasets reads
        raise ConfigError(f"data.dataset {dataset!r} holds no data files; point it at Parquet files, images in class folders "
                          "or save_to_disk output") from None
    except ValueError as error:
        if "corresponds to no data" in str(error):  # datasets' words for a split whose files hold no row
            raise _no_rows(dataset, split) from None
        if "split" in str(error).lower() or "Unknown split" in str(error):
            raise ConfigError(f"data.split {split!r} not found in {dataset!r}: {error}") from None
        raise
    except OSError as error:  # FileNotFoundError, and the hub's connection errors
        raise ConfigError(
            f"data.dataset {dataset!r} is neither a local path nor a reachable hub data set ({type(error).__name__}); "
            "pass a local directory (Parquet files, an imagefolder or save_to_disk output), or a hub id that is "
            "reachable or already cached (with HF_HUB_OFFLINE=1 only the cache is read)"
        ) from None


def _no_rows(dataset: str, split: str) -> ConfigError:
    """The error for a data set split without a row."""
    return ConfigError(f"data.dataset {dataset!r} split {split!r} has no rows; point data.dataset at a data set with images, "
                       "or choose another data.split")


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
    if len(ds) == 0:
        raise _no_rows(cfg.dataset, cfg.split)
    labels, class_names = _labels(ds, label_column, cfg.num_classes)
    images = _decode(ds, image_column)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), class_names)


def _labels(ds: datasets.Dataset, column: str, num_classes: int | None) -> tuple[np.ndarray, list[str]]:
    """The (N,) int64 labels of ``column`` and the class names; every label must be a class index."""
    values = ds[column]
    if missing := [row for row, value in enumerate(values) if value is None]:
        raise ConfigError(f"{len(missing)} rows of {column!r} have no label (None), the first at row {missing[0]} (0-based); "
                          "drop those rows from the data set, or set data.label_column")
    feature = ds.features[column]
    if not isinstance(feature, datasets.ClassLabel):
        row = next((row for row, value in enumerate(values) if isinstance(value, bool) or not isinstance(value, (int, np.integer))), None)
        if row is not None:
            raise ConfigError(f"label column {column!r} must hold class indices or be a ClassLabel; row {row} (0-based) "
                              f"holds {values[row]!r}")
    labels = np.asarray(values, dtype=np.int64)
    class_names = _class_names(feature, labels, column, num_classes)
    if (outside := np.flatnonzero((labels < 0) | (labels >= len(class_names)))).size:
        first = int(outside[0])
        raise ConfigError(f"{outside.size} labels in {column!r} are outside 0..{len(class_names) - 1}, the first {labels[first]} "
                          f"at row {first} (0-based; -1 is a ClassLabel's 'no label'); drop those rows from the data set, "
                          f"{'or raise data.num_classes' if num_classes is not None else 'or set data.label_column'}")
    return labels, class_names


def _class_names(feature: object, labels: np.ndarray, column: str, num_classes: int | None) -> list[str]:
    """A ``ClassLabel``'s names; else ``0..num_classes-1``; else (integer labels, ``num_classes`` unset) ``0..max``,
    refused where fewer than half of those occur: that is a stray label (999,999 among 0..9 would make a million
    classes), not a data set with that many classes."""
    if isinstance(feature, datasets.ClassLabel):
        if num_classes is not None and num_classes != feature.num_classes:
            raise ConfigError(f"data.num_classes {num_classes} differs from the {feature.num_classes} classes the ClassLabel "
                              f"{column!r} names; leave data.num_classes unset (none) for a ClassLabel column")
        return list(feature.names)
    if num_classes is not None:
        return [str(i) for i in range(num_classes)]
    nonnegative = labels[labels >= 0]  # negative ones are refused as outside the classes
    largest, distinct = int(nonnegative.max(initial=0)), len(np.unique(nonnegative))
    if largest + 1 > 2 * distinct:
        row = int(np.argmax(labels))
        raise ConfigError(f"label {largest} at row {row} (0-based) of {column!r} would make {largest + 1} classes, but only "
                          f"{distinct} distinct labels occur; drop or fix that row, or, if there are that many classes, set "
                          "data.num_classes (labels must then be in [0, num_classes))")
    return [str(i) for i in range(largest + 1)]


# Images of these modes hold 8-bit samples that are read as they are.
_EIGHT_BIT = ("L", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV")


def _decode(ds: datasets.Dataset, column: str, chunk: int = 4096) -> np.ndarray:
    """(N, C, H, W) uint8 images of ``column``, each scaled from its own bit depth (``_eight_bits``)."""
    column_only = ds.select_columns([column])
    arrays, shapes = [], set()
    for start in range(0, len(column_only), chunk):
        for offset, image in enumerate(column_only[start:start + chunk][column]):
            if image is None:
                raise ConfigError(f"row {start + offset} (0-based) of {column!r} has no image; drop it from the data set")
            array = _eight_bits(image, column, start + offset)
            shapes.add(array.shape)
            arrays.append(array)
    if len(shapes) > 1:  # images of mixed sizes or channel counts
        raise ConfigError(f"images in {column!r} differ in size or mode ({sorted(shapes)[:3]}...); resize them to one size first")
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    if stacked.shape[-1] != stacked.shape[-2]:
        raise ConfigError(f"images must be square, got {stacked.shape[-2]}x{stacked.shape[-1]}")
    return np.ascontiguousarray(stacked)


def _eight_bits(image: PIL.Image.Image, column: str, row: int) -> np.ndarray:
    """One decoded image as (H, W) or (H, W, C) uint8: 8-bit modes as they are, 1-bit as 0/255, palette images as
    their colours, 16-bit as round(x / 257) (65535 -> 255); a mode whose range is unknown is a ConfigError."""
    mode = image.mode
    if mode in _EIGHT_BIT:
        return np.asarray(image, dtype=np.uint8)
    if mode in ("1", "P", "PA"):  # 1-bit: 0/1 -> 0/255; palette: indices -> colours
        return np.asarray(image.convert({"1": "L", "P": "RGB", "PA": "RGBA"}[mode]), dtype=np.uint8)
    where = f"the image at row {row} (0-based) of {column!r}"
    if mode.startswith("I"):  # I;16, I;16B, ...: unsigned 16-bit; I: 32-bit signed, which 16-bit files also open as
        values = np.asarray(image).astype(np.int64)
        smallest, largest = int(values.min()), int(values.max())
        if smallest < 0 or largest > 65535 or (mode == "I" and 0 < largest <= 255):
            raise ConfigError(f"{where} has mode {mode}, integers {smallest}..{largest}, neither 16-bit "
                              "nor clearly 8-bit; convert the images to 8-bit (L or RGB) or 16-bit PNGs first")
        return ((values + 128) // 257).astype(np.uint8)  # round(x / 257): the 16-bit scale onto 8 bits, exactly
    raise ConfigError(f"{where} has mode {mode} ({'32-bit floating point, whose range is not fixed' if mode == 'F' else 'not read'}); "
                      "convert the images to 8-bit (L or RGB) first")


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
