"""Study set files: ``configs/experiments/<set>.yaml`` decoded into a checked ``StudySet``, torch-free.

A set file names a base config, a budget, seeds, evaluation settings, optional sampling sweeps and its runs; each
run is a list of overlays (names of ``configs/experiments/overlays/<name>.yaml`` or inline ``{section: {key:
value}}`` mappings) that ``load_set`` turns into ``{"section.key": value}`` overrides. Everything is decoded by
``pipeline.config.decode``, so a typo is a one-line ``ConfigError`` naming the key and the fix when the set loads,
not when its first run starts.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import SampleConfig, decode, read_yaml
from pipeline.errors import ConfigError
from pipeline.names import METRICS, PROJECT_ROOT, SAMPLING_PRECISIONS

EXPERIMENTS = PROJECT_ROOT / "configs" / "experiments"
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]
Precision = Literal[SAMPLING_PRECISIONS]  # type: ignore[valid-type]


@dataclass
class Budget:
    """What every run trains for; unset keeps the base config's stop conditions."""

    steps: int | None = None  # optimizer steps (train.max_steps)
    minutes: float | None = None  # wall minutes (train.max_minutes); the base's max_steps stays a cap


@dataclass
class Evaluation:
    """How every run is scored (pipeline.evaluation.metrics; docs/evaluation.md)."""

    per_class: int = 20  # samples per class
    seed: int = 0  # of the sampling noise
    ref_samples: Literal["all"] | int = 10_000  # train images the distances are measured against
    mixed_precision: Precision = "auto"
    metrics: tuple[MetricName, ...] = ("accuracy", "cfid")


@dataclass
class Sweep:
    """Sampling settings to evaluate some runs at, besides their own: every combination of the listed values
    (``{guidance_scale: [1, 2, 3]}``: three settings; keys are ``SampleConfig``'s), on every seed.

    A row is compared with the same run sampled with ``against`` applied (e.g. ``{guidance_ramp: constant}``:
    a ramp against constant guidance at the same scale); without ``against``, with the run ``reference`` (default:
    the set's first run, the baseline) sampled the same way."""

    runs: list[str]
    sample: dict[str, Any]  # key -> list of values (checked by check_sweep, for a clearer message than the decoder's)
    against: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None

    def settings(self, own: SampleConfig) -> list[SampleConfig]:
        """The sweep's sampling settings, on top of a run's own (decoded, so that YAML's 3 is the scale 3.0)."""
        keys = list(self.sample)
        return [decode(SampleConfig, {**dataclasses.asdict(own), **dict(zip(keys, values, strict=True))})
                for values in itertools.product(*(self.sample[key] for key in keys))]


@dataclass
class StudySet:
    """A set file's contents, decoded by ``pipeline.config.decode``; ``name`` is the file's stem and ``load_set``
    turns each run's overlays (names or inline mappings) into ``{"section.key": value}`` dicts. The first run is
    the baseline every other run is compared with."""

    name: str
    base: Path  # relative to the project root
    runs: dict[str, list[Any]]
    budget: Budget = field(default_factory=Budget)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # sections applied to every run, before its overlays
    seeds: list[int] = field(default_factory=lambda: [0])
    evaluate: Evaluation = field(default_factory=Evaluation)
    sweeps: dict[str, Sweep] = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return next(iter(self.runs))


def flatten(sections: dict[str, Any], source: str) -> dict[str, Any]:
    """``{"model": {"base_channels": 32}}`` -> ``{"model.base_channels": 32}``."""
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ConfigError(f"{source}: an overlay is a mapping of sections, e.g. {{model: {{base_channels: 32}}}}")
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def load_overlay(item: str | dict, source: str) -> dict[str, Any]:
    """An overlay by name (``overlays/<name>.yaml``) or inline, as dotted overrides."""
    if isinstance(item, dict):
        return flatten(item, source)
    path = EXPERIMENTS / "overlays" / f"{item}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (EXPERIMENTS / "overlays").glob("*.yaml"))
        raise ConfigError(f"{source}: overlay {item!r} not found; known: {', '.join(known)}")
    return flatten(read_yaml(path) or {}, str(path))


def load_set(name: str) -> StudySet:
    """``configs/experiments/<name>.yaml`` (or a path) parsed and checked."""
    path = Path(name) if name.endswith(".yaml") else EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if "runs" in (read_yaml(p) or {}))
        raise ConfigError(f"study set {name!r} not found; known sets: {', '.join(known)}")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with base and runs, got {type(raw).__name__}")
    try:
        study_set = decode(StudySet, {**raw, "name": path.stem})
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not study_set.runs:
        raise ConfigError(f"{path}: needs at least one run")
    common = flatten(study_set.overrides, f"{path}: overrides") if study_set.overrides else {}
    study_set.runs = {run: [common, *[load_overlay(item, f"{path}: run {run}") for item in items]] for run, items in study_set.runs.items()}
    for name, sweep in study_set.sweeps.items():
        check_sweep(sweep, study_set.runs, f"{path}: sweeps.{name}")
    return study_set


def check_sweep(sweep: Sweep, runs: dict[str, Any], source: str) -> None:
    """ConfigError unless the sweep names known runs and valid, non-empty sampling settings."""
    if unknown := [run for run in sweep.runs if run not in runs]:
        raise ConfigError(f"{source}.runs: {', '.join(unknown)} not among the runs {', '.join(runs)}")
    if sweep.reference is not None and sweep.reference not in sweep.runs:
        raise ConfigError(f"{source}.reference: {sweep.reference} is not one of the sweep's runs, so it would not be "
                          "sampled the same way; add it to the sweep's runs")
    if sweep.reference is not None and sweep.against:
        raise ConfigError(f"{source}: give `against` (the same run sampled otherwise) or `reference` (another run "
                          "sampled the same way), not both")
    if not sweep.sample or any(not isinstance(values, list) or not values for values in sweep.sample.values()):
        raise ConfigError(f"{source}.sample: give each sampling key a non-empty list, e.g. {{guidance_scale: [1.0, 3.0]}}")
    try:
        for key, values in sweep.sample.items():
            for value in values:
                decode(SampleConfig, {key: value})
        # decoded, so that the reference's settings compare equal to the evaluated ones (3 -> 3.0)
        sweep.against = {key: getattr(decode(SampleConfig, {key: value}), key) for key, value in sweep.against.items()}
    except ConfigError as error:
        raise ConfigError(f"{source}.sample: {error}") from None


def narrow(study_set: StudySet, runs: list[str]) -> None:
    """Keep only ``runs`` (and the sweeps' share of them); ConfigError for a run the set does not have."""
    if unknown := [r for r in runs if r not in study_set.runs]:
        raise ConfigError(f"unknown run(s) {', '.join(unknown)}; the set has {', '.join(study_set.runs)}")
    study_set.runs = {r: study_set.runs[r] for r in runs}
    sweeps = {name: dataclasses.replace(sweep, runs=[r for r in sweep.runs if r in runs]) for name, sweep in study_set.sweeps.items()}
    study_set.sweeps = {name: sweep for name, sweep in sweeps.items() if sweep.runs}
