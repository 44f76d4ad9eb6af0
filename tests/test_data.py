"""Loading images and labels: the real MNIST/CIFAR-10 Parquet copies, imagefolders, save_to_disk, and bad input."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import (
    ImageData,
    ImageDataset,
    check_augmentation,
    cutout_where,
    keep_batch,
    load_image_data,
    to_model_range,
    translate_where,
    translation_border,
)
from pipeline.errors import ConfigError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def image(size: tuple[int, int] = (8, 8), mode: str = "L", value: int = 0) -> PIL.Image.Image:
    return PIL.Image.new(mode, size, color=value if mode == "L" else (value, 255 - value, 7))


def saved_dataset(path: Path, images: list[PIL.Image.Image], columns: dict | None = None, features: dict | None = None) -> Path:
    """A ``Dataset.save_to_disk`` directory with an ``image`` column and ``columns``."""
    columns = {"label": [i % 2 for i in range(len(images))]} if columns is None else columns
    features = {"label": datasets.ClassLabel(names=["even", "odd"])} if features is None else features
    ds = datasets.Dataset.from_dict({"image": images, **columns}, features=datasets.Features({"image": datasets.Image(), **features}))
    ds.save_to_disk(str(path))
    return path


# --- the real data sets (hub-format Parquet directories) ------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_parquet(mnist_path: Path, split: str) -> None:
    data = load_image_data(DataConfig(dataset=str(mnist_path), split=split, max_samples=64))
    assert data.images.shape == (64, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.shape == (64,) and data.labels.dtype == torch.int64
    assert data.class_names == [str(i) for i in range(10)] and (data.channels, data.size, len(data)) == (1, 28, 64)
    assert 0 <= data.labels.min() and data.labels.max() <= 9 and data.images.max() == 255
    if split == "train":
        assert data.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the original IDX order


def test_cifar10_parquet(cifar10_path: Path) -> None:
    data = load_image_data(DataConfig(dataset=str(cifar10_path), split="test", max_samples=16))
    assert data.images.shape == (16, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.class_names == CIFAR10_NAMES and data.labels.max() <= 9
    assert data.images.float().std() > 10  # real photographs, not a constant


def test_unknown_split_names_the_data_set(mnist_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.split 'validation' not found in .*mnist"):
        load_image_data(DataConfig(dataset=str(mnist_path), split="validation"))


# --- local formats --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
def test_imagefolder(tmp_path: Path, mode: str, channels: int) -> None:
    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / name).mkdir()
        for i in range(3):
            image(mode=mode, value=value + i).save(tmp_path / name / f"{i}.png")
    data = load_image_data(DataConfig(dataset=str(tmp_path)))
    assert data.images.shape == (6, channels, 8, 8) and data.class_names == ["cat", "dog"]
    for label, img in zip(data.labels, data.images, strict=True):  # each image is in its folder's class
        assert (img[0, 0, 0] < 100) == (label == 0)


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    path = saved_dataset(tmp_path / "ds", [image(value=v) for v in (0, 50, 100, 255)])
    data = load_image_data(DataConfig(dataset=str(path), max_samples=3))
    assert data.images.shape == (3, 1, 8, 8) and data.labels.tolist() == [0, 1, 0] and data.class_names == ["even", "odd"]
    assert data.images[:, 0, 0, 0].tolist() == [0, 50, 100]


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path: Path) -> None:
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.Value("int64")})
    splits = {
        name: datasets.Dataset.from_dict({"img": [image(mode="RGB", value=v) for v in values], "digit": [0, 3]}, features=features)
        for name, values in (("train", (1, 2)), ("test", (3, 4)))
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path))
    data = load_image_data(DataConfig(dataset=str(tmp_path), split="test", label_column="digit"))
    assert data.images.shape == (2, 3, 8, 8) and data.images[:, 0, 0, 0].tolist() == [3, 4]
    assert data.class_names == ["0", "1", "2", "3"]  # integer labels without ClassLabel names: 0..max
    with pytest.raises(ValueError, match=r"split 'validation' not in .*; available: train, test"):
        load_image_data(DataConfig(dataset=str(tmp_path), split="validation"))


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"image_column": "picture"}, r"data.image_column 'picture' not in the data set; columns: image, label, caption"),
        ({"image_column": "caption"}, r"data.image_column 'caption' is not an image column .* image columns: image"),
        ({"label_column": "digit"}, r"data.label_column 'digit' not in the data set; columns: image, label, caption"),
        ({"label_column": "caption"}, r"label column 'caption' must hold class indices or be a ClassLabel"),
    ],
    ids=["missing-image-column", "non-image-column", "missing-label-column", "text-labels"],
)
def test_bad_columns_are_clear_errors(tmp_path: Path, config: dict, message: str) -> None:
    images = [image(), image()]
    path = saved_dataset(tmp_path / "ds", images, {"label": [0, 1], "caption": ["a", "b"]},
                         {"label": datasets.ClassLabel(names=["a", "b"]), "caption": datasets.Value("string")})
    with pytest.raises(ValueError, match=message):
        load_image_data(DataConfig(dataset=str(path), **config))


def test_no_label_column_is_a_clear_error(tmp_path: Path) -> None:
    path = saved_dataset(tmp_path / "ds", [image(), image()], {"caption": ["a", "b"]}, {"caption": datasets.Value("string")})
    with pytest.raises(ValueError, match=r"no label column found among image, caption; set data.label_column"):
        load_image_data(DataConfig(dataset=str(path)))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([image((8, 8)), image((9, 9))], r"images in 'image' differ in size or mode"),
        ([image((8, 6)), image((8, 6))], r"images must be square, got 6x8"),
    ],
    ids=["mixed-sizes", "not-square"],
)
def test_images_that_cannot_stack_are_clear_errors(tmp_path: Path, images: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_image_data(DataConfig(dataset=str(saved_dataset(tmp_path / "ds", images))))


# --- bit depths and labels -------------------------------------------------------------------------------------

# 16-bit samples and round(x / 257), their 8-bit values (the old code kept x mod 256: 55,746 -> 194)
SIXTEEN_BIT = np.array([[0, 128, 129, 257], [32896, 55746, 65407, 65535]] * 2, dtype=np.uint16)
SCALED = np.array([[0, 0, 1, 1], [128, 217, 255, 255]] * 2, dtype=np.uint8)
CHECKERBOARD = (np.indices((4, 4)).sum(0) % 2).astype(bool)


def bit_depth_images(mode: str) -> tuple[list[PIL.Image.Image], np.ndarray]:
    """Two 4x4 images of ``mode`` and the (H, W) or (H, W, 3) uint8 values the loader must give for them."""
    if mode == "I;16":
        return [PIL.Image.fromarray(SIXTEEN_BIT)] * 2, SCALED
    if mode == "I":  # 16-bit samples held as 32-bit integers, as TIFF files and older Pillow's 16-bit PNGs open
        return [PIL.Image.fromarray(SIXTEEN_BIT.astype(np.int32))] * 2, SCALED
    if mode == "1":
        return [PIL.Image.fromarray(CHECKERBOARD)] * 2, CHECKERBOARD.astype(np.uint8) * 255
    palette = PIL.Image.fromarray(CHECKERBOARD.astype(np.uint8), mode="L").convert("P")
    palette.putpalette([0, 0, 0, 200, 30, 90] + [0, 0, 0] * 254)  # index 1 -> a purple, not the value 1
    return [palette] * 2, np.where(CHECKERBOARD[..., None], np.array([200, 30, 90], dtype=np.uint8), 0).astype(np.uint8)


def write_images(path: Path, images: list[PIL.Image.Image], layout: str, labels: list | None = None,
                 feature: datasets.features.features.FeatureType | None = None) -> Path:
    """``images`` as an imagefolder (one class folder per image, TIFF where PNG cannot hold the mode) or as a Parquet
    file (the hub's layout, as the real MNIST copy), with ``labels``."""
    if layout == "imagefolder":
        for i, img in enumerate(images):
            (path / f"class{i}").mkdir(parents=True)
            img.save(path / f"class{i}" / ("0.tiff" if img.mode in ("I", "F") else "0.png"))
        return path
    labels = list(range(len(images))) if labels is None else labels
    features = datasets.Features({"image": datasets.Image(), "label": feature or datasets.Value("int64")})
    path.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path / "train.parquet"))
    return path


@pytest.mark.parametrize("layout", ["imagefolder", "parquet"])
@pytest.mark.parametrize("mode", ["I;16", "I", "1", "P"])
def test_images_of_every_bit_depth_are_scaled_to_8_bits(tmp_path: Path, mode: str, layout: str) -> None:
    """16-bit images as round(x / 257) (the old code wrapped them modulo 256), 1-bit ones as 0/255 (not 0/1 out of
    255), palette images as their colours (not their palette indices)."""
    images, expected = bit_depth_images(mode)
    data = load_image_data(DataConfig(dataset=str(write_images(tmp_path / "data", images, layout))))
    channels = 1 if expected.ndim == 2 else 3
    assert data.images.shape == (2, channels, 4, 4) and data.images.dtype == torch.uint8
    assert data.images[0].permute(1, 2, 0).squeeze(-1).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("image_", "message"),
    [
        (PIL.Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), r"the image at row 0 \(0-based\) of 'image' has mode F "
                                                                     r"\(32-bit floating point, whose range is not fixed\); convert"),
        (PIL.Image.fromarray(np.full((4, 4), 200, dtype=np.int32)), r"has mode I, integers 200..200, neither 16-bit nor clearly 8-bit"),
        (PIL.Image.fromarray(np.full((4, 4), -5, dtype=np.int32)), r"has mode I, integers -5..-5, neither 16-bit"),
    ],
    ids=["float", "8-bit-values-in-32-bit", "negative"],
)
def test_images_without_a_known_range_are_refused(tmp_path: Path, image_: PIL.Image.Image, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_image_data(DataConfig(dataset=str(write_images(tmp_path / "data", [image_, image_], "parquet"))))


@pytest.mark.parametrize(
    ("labels", "num_classes", "classes", "message"),
    [
        ([0, 3, 1, 3], None, 4, None),  # 0..3 inferred: three of the four occur
        ([0, 1, 2, 999_999], None, None, r"^label 999999 at row 3 \(0-based\) of 'label' would make 1000000 classes, but only 4 "
                                         r"distinct labels occur; .* set data.num_classes \(labels must then be in \[0, num_classes\)\)$"),
        ([0, 1, 2, 999_999], 10, None, r"^1 labels in 'label' are outside 0..9, the first 999999 at row 3 \(0-based.*data.num_classes$"),
        ([0, 9, 1, 9], 12, 12, None),  # explicit: classes 10 and 11 have no images here
        ([0, 9, 1, 9], None, None, r"label 9 at row 1 .* would make 10 classes, but only 3 distinct"),
        ([0, None, 1, None], None, None, r"^2 rows of 'label' have no label \(None\), the first at row 1 \(0-based\); drop"),
        ([0, 1.5, 1, 0], None, None, r"label column 'label' must hold class indices or be a ClassLabel; row 0 \(0-based\) holds 0.0"),
    ],
    ids=["inferred", "stray-label", "outside-num-classes", "num-classes", "too-sparse", "none", "float"],
)
def test_integer_labels_give_classes_or_one_clear_error(tmp_path: Path, labels: list, num_classes: int | None, classes: int | None,
                                                       message: str | None) -> None:
    """Integer labels without class names: 0..max, unless fewer than half of those occur (a stray 999,999 made a
    million classes); ``data.num_classes`` sets the count, and a missing label is named with its row."""
    feature = datasets.Value("float64") if any(isinstance(v, float) for v in labels) else None
    path = write_images(tmp_path / "data", [image()] * len(labels), "parquet", labels, feature)
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            load_image_data(DataConfig(dataset=str(path), num_classes=num_classes))
        return
    data = load_image_data(DataConfig(dataset=str(path), num_classes=num_classes))
    assert data.class_names == [str(i) for i in range(classes)] and data.labels.tolist() == labels


def test_num_classes_must_match_a_class_label(tmp_path: Path) -> None:
    path = saved_dataset(tmp_path / "ds", [image(), image()])
    assert load_image_data(DataConfig(dataset=str(path), num_classes=2)).class_names == ["even", "odd"]
    with pytest.raises(ConfigError, match=r"^data.num_classes 3 differs from the 2 classes the ClassLabel 'label' names; leave"):
        load_image_data(DataConfig(dataset=str(path), num_classes=3))


@pytest.mark.parametrize(("layout", "labels"), [("save_to_disk", datasets.ClassLabel(names=["a", "b"])), ("save_to_disk", None),
                                               ("parquet", datasets.ClassLabel(names=["a", "b"]))],
                         ids=["saved-class-label", "saved-integers", "parquet"])
def test_an_empty_data_set_is_one_clear_error(tmp_path: Path, layout: str, labels: datasets.features.features.FeatureType | None) -> None:
    """No rows (a filter that kept none): one line, not datasets' IndexError or ValueError (the old code's traceback)."""
    if layout == "parquet":
        path = write_images(tmp_path / "ds", [], layout, [], labels)
    else:
        path = saved_dataset(tmp_path / "ds", [], {"label": []}, {"label": labels or datasets.Value("int64")})
    with pytest.raises(ConfigError, match=r"^data.dataset '.*ds' split 'train' has no rows; point data.dataset at a data set with images"):
        load_image_data(DataConfig(dataset=str(path)))


def test_a_directory_without_data_files_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^data.dataset '.*empty' holds no data files; point it at Parquet files"):
        load_image_data(DataConfig(dataset=str(tmp_path / "empty")))


# --- batches --------------------------------------------------------------------------------------------------


def test_batches_are_one_gather_in_model_range() -> None:
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2) * 85  # 0, 85, 170, 255
    dataset = ImageDataset(ImageData(images.contiguous(), torch.tensor([0, 1, 2, 3]), ["a", "b", "c", "d"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=keep_batch)
    batch, labels = next(iter(loader))
    assert batch.shape == (3, 1, 2, 2) and labels.tolist() == [0, 1, 2]
    assert to_model_range(images)[:, 0, 0, 0].tolist() == [-1.0, pytest.approx(-1 / 3), pytest.approx(1 / 3), 1.0]



# --- augmentations --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(mnist_path: Path) -> torch.Tensor:
    """Four real MNIST digits in the model's range, (4, 1, 28, 28)."""
    return to_model_range(load_image_data(DataConfig(dataset=str(mnist_path), max_samples=4)).images)


def test_translation_moves_every_pixel_by_its_shift_and_fills_the_border_with_black(digits: torch.Tensor) -> None:
    shifts = torch.tensor([[2, -1], [-2, 2], [0, 1], [1, 0]])  # (down, right)
    out = translate_where(digits, shifts, 2, border=-1.0)
    for image, moved, (down, right) in zip(digits, out, shifts.tolist(), strict=True):
        expected = torch.full_like(image, -1.0)
        rows, cols = slice(max(down, 0), 28 + min(down, 0)), slice(max(right, 0), 28 + min(right, 0))
        expected[:, rows, cols] = image[:, max(-down, 0) : 28 - max(down, 0), max(-right, 0) : 28 - max(right, 0)]
        assert torch.equal(moved, expected), (down, right)
    assert not torch.equal(out[0], digits[0])  # the digit did move (not all its pixels are background)


def test_reflected_border_mirrors_the_edge_whatever_the_padding() -> None:
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    shifts = torch.tensor([[0, 1], [-2, 0]])
    out = translate_where(images, shifts, 2, border="reflect")
    assert torch.equal(out[0, :, :, 1:], images[0, :, :, :-1]) and torch.equal(out[0, :, :, 0], images[0, :, :, 1])
    assert torch.equal(out[1, :, :4], images[1, :, 2:]) and torch.equal(out[1, :, 4:], images[1, :, [4, 3]])
    assert torch.equal(translate_where(images, shifts, 4, border="reflect"), out)  # max_shift only sizes the padding


@pytest.mark.parametrize("border", [-1.0, "reflect"])
def test_zero_translation_is_the_identity(digits: torch.Tensor, border: float | str) -> None:
    assert torch.equal(translate_where(digits, torch.zeros(4, 2, dtype=torch.long), 3, border), digits)


def test_translation_border_is_black_for_grayscale_and_mirrored_for_colour() -> None:
    assert translation_border(1, black=-1.0) == -1.0 and translation_border(3, black=0.0) == "reflect"


@pytest.mark.parametrize("size", [6, 5])
def test_cutout_blanks_exactly_the_square_clipped_at_the_border(digits: torch.Tensor, size: int) -> None:
    centers = torch.tensor([[14, 14], [0, 27], [27, 0], [3, 20]])  # (row, column); the middle two overhang a corner
    out = cutout_where(digits, centers, size)
    expected = digits.clone()
    for image, (row, col) in zip(expected, centers.tolist(), strict=True):
        top, left = row - size // 2, col - size // 2
        image[:, max(top, 0) : top + size, max(left, 0) : left + size] = 0.0
    assert torch.equal(out, expected)
    blanked = (out == 0).flatten(1).sum(1)
    assert blanked[0] == size * size and blanked[1] < size * size  # whole in the middle, clipped in the corner


def test_augmentation_must_fit_the_image_size() -> None:
    check_augmentation(DataConfig(translate=13, cutout=28), 28)
    with pytest.raises(ConfigError, match=r"^data.translate 14 must be less than half the image size \(28 px\); use at most 13$"):
        check_augmentation(DataConfig(translate=14), 28)
    with pytest.raises(ConfigError, match=r"^data.cutout 33 must be at most the image size \(32 px\); use at most 32$"):
        check_augmentation(DataConfig(cutout=33), 32)
