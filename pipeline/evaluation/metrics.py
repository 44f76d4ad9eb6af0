"""Score sample sets and trained pipelines: conditional accuracy, classifier-feature FID, FID, Inception Score.

>>> evaluator = Evaluator("data/mnist", metrics=("accuracy",))
>>> evaluator.score(generate(pipe, per_class=100, sample=SampleConfig("dpmsolver++", 20, 2.0)))["accuracy"]
0.97

``Evaluator`` holds what one data set needs (its classifier, the Inception network, cached reference
statistics) and scores any ``Samples`` with the compute function of each metric the registry
``pipeline.names.METRICS`` lists (``score_accuracy``, ``score_cfid``, ``score_fid``, ``score_is`` here); ``evaluate``
adds the seed's Table 2 baselines (pure noise, the real test set) next to the model, and ``markdown_table`` renders
the result with the registry's columns.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from pipeline.config import DataConfig, SampleConfig
from pipeline.data import ImageData, load_image_data
from pipeline.errors import ConfigError
from pipeline.evaluation.classifier import ImageClassifier, load_classifier
from pipeline.evaluation.fid import ClassifierFeatures, FeatureStats, InceptionFeatures, frechet_distance, reference_stats
from pipeline.evaluation.inception_score import ImageNetInceptionLogits, InceptionScoreUnavailable, inception_score
from pipeline.names import COLUMNS, METRICS
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.sampling import Precision, Samples, class_labels, generate

# A metric's compute function: (evaluator, samples, features) -> {column: value}; ``features`` is a cache shared by the
# metrics of one ``Evaluator.score`` call, extractor name -> (N, D) features, so that accuracy and cfid share one
# classifier pass.
ScoreFunction = Callable[["Evaluator", Samples, dict[str, torch.Tensor]], dict[str, Any]]


def classifier_name(dataset: str) -> str:
    """The committed classifier for a data set path or hub id: ``../shared/data/mnist``, ``ylecun/mnist`` -> ``mnist``."""
    return Path(dataset.rstrip("/")).name.lower()


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"accuracy,fid"`` -> ("accuracy", "fid"), checked against the registry ``pipeline.names.METRICS``."""
    names = tuple(m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip())
    if unknown := [m for m in names if m not in METRICS]:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not names:
        raise ConfigError(f"no metric chosen; choose from {', '.join(METRICS)}")
    return names


@functools.cache
def score_function(metric: str) -> ScoreFunction:
    """The compute function of ``metric``, imported from its registry entry's ``"module:function"``."""
    module, name = METRICS[metric].compute.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class Evaluator:
    """Everything needed to score samples of one data set.

    A new metric plugs in with an entry in ``pipeline.names.METRICS`` and its compute function (a ``ScoreFunction``,
    like ``score_fid`` below); if it needs a network of its own, ``__post_init__`` builds it when the metric is
    asked for (``extractors`` holds the feature networks that ``extracted`` runs once per scored set).

    Args:
        dataset: the data set the model was trained on (path or hub id).
        metrics: a subset of the registry ``pipeline.names.METRICS``.
        classifier: a loaded classifier, a committed name or directory (default: the one named like the data set).
        reference: split and row count the distances are measured against (default: the first 10,000 train images).
        device: where the classifier and Inception run.
        cache: keep reference statistics on disk (``pipeline.evaluation.fid.cache_dir``).
    """

    dataset: str
    metrics: tuple[str, ...] = ("accuracy", "cfid")
    classifier: ImageClassifier | str | Path | None = None
    reference: DataConfig | None = None
    device: str | torch.device = "cpu"
    cache: bool = True
    unavailable: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = parse_metrics(self.metrics)
        if self.reference is None:
            self.reference = DataConfig(dataset=self.dataset, split="train", max_samples=10_000)
        self._reference_images: ImageData | None = None
        self._stats: dict[str, FeatureStats] = {}
        self.extractors: dict[str, InceptionFeatures | ClassifierFeatures] = {}
        if {"accuracy", "cfid"} & set(self.metrics):
            if not isinstance(self.classifier, ImageClassifier):
                self.classifier = load_classifier(self.classifier or classifier_name(self.dataset), self.device)
            self.extractors["cfid"] = ClassifierFeatures(self.classifier)
        if "fid" in self.metrics:
            self.extractors["fid"] = InceptionFeatures(self.device)
        self.inception_logits = None
        if "is" in self.metrics:
            try:
                self.inception_logits = ImageNetInceptionLogits(self.device)
            except InceptionScoreUnavailable as error:
                self.unavailable["is"] = str(error)

    def reference_stats(self, metric: str) -> FeatureStats:
        """Reference statistics for ``cfid`` or ``fid``, computed once (and cached on disk)."""
        if metric not in self._stats:
            if self._reference_images is None:
                self._reference_images = load_image_data(self.reference)
            self._stats[metric] = reference_stats(self.reference, self.extractors[metric], self._reference_images, self.cache)
        return self._stats[metric]

    def extracted(self, extractor: str, samples: Samples, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, D) features of ``samples`` by ``extractors[extractor]`` (``"cfid"``: the classifier's penultimate layer,
        ``"fid"``: Inception pool_3), computed once per ``cache``."""
        if extractor not in cache:
            cache[extractor] = self.extractors[extractor](samples.images)
        return cache[extractor]

    def score(self, samples: Samples) -> dict[str, Any]:
        """Metrics of one sample set: ``{"n", "accuracy", "class_is", "per_class_accuracy", "cfid", "fid", "is"}``
        (only those asked for, in the registry's order; ``None`` where unavailable)."""
        row: dict[str, Any] = {"n": len(samples)}
        features: dict[str, torch.Tensor] = {}
        for metric in METRICS:
            if metric in self.metrics:
                row.update(score_function(metric)(self, samples, features))
        return row

    def real(self, per_class: int, split: str = "test") -> Samples:
        """The first ``per_class`` images of each class of ``split``: the "real data" row."""
        data = load_image_data(DataConfig(dataset=self.dataset, split=split))
        index = torch.cat([torch.nonzero(data.labels == c).flatten()[:per_class] for c in range(len(data.class_names))])
        return Samples(data.images[index], data.labels[index])

    def noise(self, per_class: int, seed: int = 0) -> Samples:
        """Uniform random 8-bit images of the data set's shape, labelled in class order: the "pure noise" row."""
        data = self._reference_images if self._reference_images is not None else load_image_data(
            DataConfig(dataset=self.dataset, split=self.reference.split, max_samples=1))
        labels = class_labels(len(data.class_names), per_class)
        shape = (len(labels), data.channels, data.size, data.size)
        images = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        return Samples(images, labels)


def score_accuracy(evaluator: Evaluator, samples: Samples, features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The share of samples the project classifier assigns to their conditioning class, the Inception Score of its
    logits (``class_is``) and the accuracy of each class (``per_class_accuracy``, a list)."""
    classifier = evaluator.classifier
    with torch.inference_mode():
        logits = classifier.logits(evaluator.extracted("cfid", samples, features).to(classifier.device)).float().cpu()
    correct = (logits.argmax(1) == samples.labels).float()
    return {
        "accuracy": correct.mean().item(),
        "class_is": inception_score(logits, splits=1)[0],
        "per_class_accuracy": [correct[samples.labels == c].mean().item() for c in range(classifier.config.num_classes)],
    }


def score_cfid(evaluator: Evaluator, samples: Samples, features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The Fréchet distance of the classifier's penultimate features to the reference split's."""
    return {"cfid": _frechet_to_reference(evaluator, "cfid", samples, features)}


def score_fid(evaluator: Evaluator, samples: Samples, features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """FID: the Fréchet distance of TF-Inception pool_3 features to the reference split's."""
    return {"fid": _frechet_to_reference(evaluator, "fid", samples, features)}


def score_is(evaluator: Evaluator, samples: Samples, features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ImageNet Inception Score, None where its network is unavailable (``Evaluator.unavailable`` says why)."""
    logits = evaluator.inception_logits
    return {"is": inception_score(logits(samples.images))[0] if logits else None}


def _frechet_to_reference(evaluator: Evaluator, extractor: str, samples: Samples, features: dict[str, torch.Tensor]) -> float:
    stats = FeatureStats.of(evaluator.extracted(extractor, samples, features).numpy())
    return frechet_distance(stats, evaluator.reference_stats(extractor))


def evaluate(
    pipe: ConditionalDiffusionPipeline | None,
    evaluator: Evaluator,
    per_class: int,
    sample: SampleConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    mixed_precision: Precision = "auto",
    baselines: bool = True,
    real_split: str = "test",
    state: PartialState | None = None,
) -> dict[str, Any]:
    """The model's row (when ``pipe`` is given) and, with ``baselines``, pure noise and real ``real_split`` images.

    Every process of ``state`` must call this (they share the sampling); the main process scores.
    Returns ``{"rows": [{"name", "n", <metrics>, "wall_s"}...], "unavailable": {metric: reason}, ...settings}``.
    """
    sample = sample or SampleConfig()
    sets = []
    if pipe is not None:
        sets.append(("model", lambda: generate(pipe, per_class, sample, seed, batch_size, mixed_precision, state)))
    if baselines:
        sets.append(("pure noise", lambda: evaluator.noise(per_class, seed)))
        sets.append((f"real {real_split} set", lambda: evaluator.real(per_class, real_split)))
    rows = []
    for name, make in sets:
        started = time.time()
        samples = make()
        made = time.time()
        row = evaluator.score(samples) if state is None or state.is_main_process else {}
        rows.append({"name": name, **row, "sample_s": round(made - started, 1), "wall_s": round(time.time() - started, 1)})
    reference = evaluator.reference
    return {
        "dataset": evaluator.dataset,
        "reference": {"split": reference.split, "max_samples": reference.max_samples},
        "per_class": per_class,
        "seed": seed,
        "sample": dataclasses.asdict(sample),  # every SampleConfig field: guidance interval and ramp too
        "metrics": list(evaluator.metrics),
        "unavailable": dict(evaluator.unavailable),
        "rows": rows,
    }


def evaluate_for_training(
    pipe: ConditionalDiffusionPipeline,
    evaluator: Evaluator,
    per_class: int = 10,
    sample: SampleConfig | None = None,
    seed: int = 0,
    mixed_precision: Precision = "auto",
) -> dict[str, float]:
    """Small-N metrics for TensorBoard during training, e.g. ``{"eval/accuracy": 0.93, "eval/cfid": 4.1}``.

    Call it on the main process only (it samples alone); build ``evaluator`` once, e.g.
    ``Evaluator(cfg.data.dataset, metrics=("accuracy", "cfid"))``. 10 per class with a small MNIST model
    and 20 steps takes a few seconds on a CPU.
    """
    row = evaluator.score(generate(pipe, per_class, sample, seed, mixed_precision=mixed_precision))
    return {f"eval/{key}": float(value) for key, value in row.items() if key in COLUMNS and value is not None}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Iterable[str] = tuple(COLUMNS), first: str = "name") -> str:
    """Rows of ``evaluate`` (or the study) as a Markdown table of the columns present in any row (by default every
    column of the registry ``pipeline.names.COLUMNS``, in its order)."""
    present = [c for c in columns if any(c in row for row in rows)]
    shown = [first, "n", *present] if any("n" in row for row in rows) else [first, *present]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def hardware() -> str:
    """This machine in a few words, for the table's caption."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    threads = f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in os.environ else ""
    return f"CPU {names[0] if names else platform.machine()}, {os.cpu_count()} cores{threads}, torch {torch.__version__}"
