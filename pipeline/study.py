"""Run one of the seed's comparisons end to end: train every variant on every seed, evaluate, tabulate with
uncertainties, draw.

    python -m pipeline.study --set mnist                        # configs/experiments/mnist.yaml, on this machine
    python -m pipeline.study --set mnist --budget-steps 500 --seeds 0,1 --runs baseline,cosine
    python -m pipeline.study --set cifar10-cpu --dataset ../shared/data/cifar10
    python -m pipeline.study --set cifar10 --launcher "accelerate launch --num_processes 8"
    python -m pipeline.study --set mnist --report-only          # re-tabulate and redraw finished runs

A set file (``configs/experiments/<set>.yaml``) names a base config, a budget (``steps`` or ``minutes``),
seeds, evaluation settings, optional sampling sweeps and its runs; each run is a list of overlays, names
of ``configs/experiments/overlays/<name>.yaml`` or inline ``{section: {key: value}}`` mappings, applied
in order on the base. Runs go to ``runs/study/<set>/<run>-s<seed>/`` and are skipped when already trained
with the same config; every evaluation is kept beside its run (``evaluations/``), so an interrupted study
resumes where it stopped. The output directory gets ``results.json`` (every seed's row), ``results.md``
(mean ± standard deviation over seeds, and each difference against its reference with its standard error,
in bold where it exceeds two) and the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.checkpointing import list_checkpoints
from pipeline.config import PROJECT_ROOT, Config, ConfigError, DataConfig, SampleConfig, decode, load_config, read_yaml
from pipeline.evaluation.metrics import METRICS
from pipeline.sampling import Precision

EXPERIMENTS = PROJECT_ROOT / "configs" / "experiments"
MetricName = Literal[METRICS]  # type: ignore[valid-type]
# The columns a study reports, in order (class_is comes with accuracy), and the direction that is better.
STUDY_PROGRESS = "study-progress.json"  # a start under way: its config, start time and earlier starts' seconds
REPORTED = {"accuracy": "higher", "class_is": "higher", "cfid": "lower", "fid": "lower", "is": "higher"}


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


def run_config(study: StudySet, run: str, seed: int, runs_dir: Path, dataset: str | None = None) -> Config:
    """The full config of one run: base, overlays, budget and seed (and ``dataset``, when given), validated."""
    overrides: dict[str, Any] = {}
    for overlay in study.runs[run]:
        overrides.update(overlay)
    if dataset is not None:
        overrides["data.dataset"] = dataset
    if study.budget.steps is not None:
        overrides["train.max_steps"] = study.budget.steps
    if study.budget.minutes is not None:  # the base's max_steps stays as a cap (and the length of its LR schedule)
        overrides["train.max_minutes"] = study.budget.minutes
    overrides.update({"train.seed": seed, "train.output_dir": str(runs_dir / f"{run}-s{seed}")})
    return load_config(PROJECT_ROOT / study.base, overrides)


def train_run(cfg: Config, launcher: str) -> float:
    """Train ``cfg`` in a subprocess unless its output already holds a pipeline trained with this exact config; a
    start of the same config that was cut off (a session's end, a kill) is continued from its latest checkpoint.
    Returns the training wall time in seconds (the recorded one when skipped; summed over starts when continued,
    each cut-off start counted up to the checkpoint it was continued from)."""
    out = Path(cfg.train.output_dir)
    record, progress_file = out / "study-run.json", out / STUDY_PROGRESS
    wanted = json.loads(json.dumps(cfg.to_dict()))
    if record.is_file() and (out / "pipeline").is_dir():
        done = json.loads(record.read_text())
        if same_config(done["config"], wanted):
            print(f"[study] {out.name}: already trained, skipping", flush=True)
            return done["train_s"]
    checkpoints = list_checkpoints(out)
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else None
    resume = bool(checkpoints) and progress is not None and same_config(progress["config"], wanted)
    before, starts = 0.0, 1
    if resume:  # the cut-off start counts until its last checkpoint, the work after it is done again
        reached = max(0.0, checkpoints[-1].stat().st_mtime - progress["started"])
        before, starts = progress["train_s"] + reached, progress["starts"] + 1
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / EVALUATIONS, ignore_errors=True)  # they scored the model this run replaces
    cfg.save(out / "study-config.yaml")
    command = [*shlex.split(launcher), str(PROJECT_ROOT / "pipeline" / "train.py"), "--config", str(out / "study-config.yaml")]
    if resume:
        command += ["--resume", "latest"]
    elif checkpoints:  # another config's run: train.py moves its outputs aside (kept, not deleted)
        command += ["--train.overwrite", "true"]
    print(f"[study] {out.name}: {' '.join(command)}", flush=True)
    started = time.time()
    progress_file.write_text(json.dumps({"config": wanted, "started": started, "train_s": before, "starts": starts}) + "\n")
    code = subprocess.call(command, env={**os.environ, "TQDM_DISABLE": "1"})
    train_s = before + time.time() - started
    if code not in (0, 75) or not (out / "pipeline").is_dir():  # 75: stopped at max_minutes, pipeline exported
        raise RuntimeError(f"training {out} failed with exit status {code}")
    record.write_text(json.dumps({"config": wanted, "train_s": train_s, "exit": code, "starts": starts}, indent=2) + "\n")
    progress_file.unlink()
    return train_s


def same_config(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a recorded config is ``wanted`` (a JSON-normalised ``Config.to_dict()``); a key added to the config
    since the record was written reads as its default, which is what that run trained with."""
    try:
        return json.loads(json.dumps(decode(Config, recorded).to_dict())) == wanted
    except ConfigError:  # a key since removed or renamed: another config
        return False


def final_loss(run_dir: Path, last: int = 5) -> float | None:
    """Mean of the last ``last`` logged ``train/loss`` values (a loss at one step is too noisy)."""
    from pipeline.tensorboard_logs import read_scalars

    steps, values = read_scalars(run_dir, "train/loss")
    return float(sum(values[-last:]) / len(values[-last:])) if values else None


def variant(sample: SampleConfig, own: SampleConfig) -> str:
    """A short name for sampling settings: the sampler and steps where they differ from the run's own, then the
    guidance (``ddpm 100 steps, s=3, increasing ramp``)."""
    steps = [] if (sample.sampler, sample.num_inference_steps) == (own.sampler, own.num_inference_steps) else [
        f"{sample.sampler} {sample.num_inference_steps} steps"]
    return ", ".join([*steps, sample.guidance_text(compact=True)])


EVALUATIONS = "evaluations"  # a run's cached evaluations, one JSON file per setting


def reference_data(dataset: str, ev: Evaluation) -> DataConfig:
    """The training images the distances are measured against."""
    return DataConfig(dataset=dataset, split="train", max_samples=None if ev.ref_samples == "all" else ev.ref_samples)


def evaluate_run(study_set: StudySet, run: str, seed: int, cfg: Config, train_s: float, evaluators: dict[str, Any],
                 device: str) -> list[dict[str, Any]]:
    """The rows of one trained run: at its own sampling settings and at its sweeps', each ``cached`` in the run."""
    from pipeline.evaluation.metrics import evaluate
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

    ev, run_dir, dataset = study_set.evaluate, Path(cfg.train.output_dir), cfg.data.dataset
    reference = reference_data(dataset, ev)
    settings: dict[tuple, list[str]] = {_frozen(cfg.sample): []}  # each setting once, with the sweeps that ask for it
    for name, sweep in study_set.sweeps.items():
        for sample in sweep.settings(cfg.sample) if run in sweep.runs else []:
            settings.setdefault(_frozen(sample), []).append(name)
    pipe, rows, loss = None, [], final_loss(run_dir)
    for frozen, sweeps in settings.items():
        sample = SampleConfig(**dict(frozen))
        key = {"dataset": dataset, "reference": dataclasses.asdict(reference), "per_class": ev.per_class, "seed": ev.seed,
               "metrics": list(ev.metrics), "mixed_precision": ev.mixed_precision, "sample": dataclasses.asdict(sample)}

        def score(sample: SampleConfig = sample) -> dict[str, Any]:
            nonlocal pipe
            pipe = pipe or ConditionalDiffusionPipeline.from_pretrained(str(run_dir / "pipeline")).to(device)
            result = evaluate(pipe, evaluator(evaluators, dataset, ev, device), ev.per_class, sample, ev.seed,
                              mixed_precision=ev.mixed_precision, baselines=False)
            row = {k: v for k, v in result["rows"][0].items() if k != "name"}
            return {**row, "params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 3)}

        row = cached(run_dir, key, score)
        rows.append({"run": run, "seed": seed, "variant": variant(sample, cfg.sample), "sample": dataclasses.asdict(sample),
                     "sweeps": sweeps, **row, "final_loss": loss, "train_s": round(train_s, 1), "dataset": dataset})
        shown = {k: v for k, v in rows[-1].items() if k not in ("per_class_accuracy", "sample")}
        print(f"[study] {run}-s{seed}: {json.dumps(shown)}", flush=True)
    return rows


def evaluator(evaluators: dict[str, Any], dataset: str, ev: Evaluation, device: str) -> Any:
    """The data set's ``Evaluator`` (its classifier and reference statistics), built on first use and kept."""
    from pipeline.evaluation.metrics import Evaluator

    if dataset not in evaluators:
        evaluators[dataset] = Evaluator(dataset, ev.metrics, reference=reference_data(dataset, ev), device=device)
    return evaluators[dataset]


def cached(folder: Path, key: dict[str, Any], score: Callable[[], Any]) -> Any:
    """``score()``, kept in ``<folder>/evaluations/`` under a hash of ``key`` (everything that decides the numbers)
    and read from there when present."""
    path = folder / EVALUATIONS / f"{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())["row"]
    row = score()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps({"key": key, "row": row}, indent=2) + "\n")
    path.with_suffix(".tmp").replace(path)  # whole or absent, so an interrupted study never reads half a file
    return row


def study(study_set: StudySet, out: Path, runs_dir: Path, launcher: str, report_only: bool = False,
          dataset: str | None = None) -> dict[str, Any]:
    """Train (unless ``report_only``), evaluate and draw every run of ``study_set`` on every seed; write the results
    to ``out``."""
    from pipeline.evaluation.metrics import evaluate, hardware

    ev = study_set.evaluate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluators: dict[str, Any] = {}
    rows, first_seed = [], {}
    started = time.time()
    for run in study_set.runs:
        for seed in study_set.seeds:
            # Train the run (or find it trained), then evaluate it (or find its evaluations).
            cfg = run_config(study_set, run, seed, runs_dir, dataset)
            if report_only:
                record = Path(cfg.train.output_dir) / "study-run.json"
                if not record.is_file():
                    print(f"[study] {run}-s{seed}: not trained yet, left out of the report", flush=True)
                    continue
                train_s = json.loads(record.read_text())["train_s"]
            else:
                train_s = train_run(cfg, launcher)
            rows += evaluate_run(study_set, run, seed, cfg, train_s, evaluators, device)
            first_seed.setdefault(run, (Path(cfg.train.output_dir), cfg))
    # The data sets' own rows (the seed's Table 2): uniform noise and real test images, scored the same way.
    for data in dict.fromkeys(row["dataset"] for row in rows):
        key = {"dataset": data, "reference": dataclasses.asdict(reference_data(data, ev)), "per_class": ev.per_class,
               "seed": ev.seed, "metrics": list(ev.metrics), "baselines": True}
        for row in cached(runs_dir, key, lambda data=data: evaluate(None, evaluator(evaluators, data, ev, device), ev.per_class,
                                                                     seed=ev.seed)["rows"]):
            rows.append({"run": row.pop("name"), "dataset": data, **row})
    budget = {key: value for key, value in dataclasses.asdict(study_set.budget).items() if value is not None}
    result = {"set": study_set.name, "budget": budget, "seeds": study_set.seeds, "evaluate": dataclasses.asdict(ev),
              "baseline": study_set.baseline, "sweeps": {name: dataclasses.asdict(s) for name, s in study_set.sweeps.items()},
              "hardware": hardware(), "launcher": launcher.replace(shlex.quote(sys.executable), "python"),  # no machine path in results
              "wall_s": round(time.time() - started, 1), "work_s": round(_work_seconds(rows), 1), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(report(result))
    draw(study_set, first_seed, result, out)
    return result


def _work_seconds(rows: list[dict[str, Any]]) -> float:
    """What the study's results cost, however many sessions and reports they took: each run's training once, and
    every evaluation's wall time (``wall_s`` of this command alone says little when most came from the cache)."""
    training = {(row["run"], row["seed"]): row["train_s"] for row in rows if "seed" in row}
    return sum(training.values()) + sum(row.get("wall_s") or 0 for row in rows)


def _frozen(sample: SampleConfig) -> tuple:
    """Hashable sampling settings (lists, e.g. an interval, as tuples)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(sample).items())


def aggregate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (run, sampling settings): every reported metric as (mean, standard deviation, seeds), and its
    difference from the row's reference with the standard error of that difference. The reference is the same run
    with its sweep's ``against`` applied, else its sweep's ``reference`` run (default: the baseline) sampled the same
    way; the error is paired over seeds for the same run (the same models), Welch's between runs."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in result["rows"]:
        if "seed" in row:
            groups.setdefault((row["run"], json.dumps(row["sample"], sort_keys=True)), []).append(row)
    aggregated = []
    for (run, _), members in groups.items():
        first = members[0]
        sweeps = [result["sweeps"][name] for name in first["sweeps"]]
        changes = next((sweep["against"] for sweep in sweeps if sweep["against"]), None)
        other = next((sweep["reference"] for sweep in sweeps if sweep.get("reference")), result["baseline"])
        reference_run, reference_sample = (run, {**first["sample"], **changes}) if changes else (other, first["sample"])
        reference = groups.get((reference_run, json.dumps(reference_sample, sort_keys=True)))
        if reference is members:
            reference = None
        row: dict[str, Any] = {"run": run, "variant": first["variant"], "sweeps": first["sweeps"], "sample": first["sample"],
                               "seeds": len(members)}
        if reference is not None:
            row["reference"] = f"{reference_run} ({reference[0]['variant']})"
        for metric in REPORTED:
            values = {m["seed"]: m[metric] for m in members if m.get(metric) is not None}
            if not values:
                continue
            row[metric] = (statistics.fmean(values.values()), _sd(list(values.values())))
            reference_values = {m["seed"]: m[metric] for m in reference or [] if m.get(metric) is not None}
            if reference_values:
                row[f"delta_{metric}"] = _difference(values, reference_values, paired=reference_run == run)
        aggregated.append(row)
    return aggregated


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _difference(values: dict[int, float], reference: dict[int, float], paired: bool) -> tuple[float, float]:
    """(mean difference, its standard error); nan when there are too few seeds to estimate it."""
    if paired:
        common = sorted(set(values) & set(reference))
        differences = [values[s] - reference[s] for s in common]
        return statistics.fmean(differences), _sd(differences) / math.sqrt(len(differences))
    difference = statistics.fmean(values.values()) - statistics.fmean(reference.values())
    a, b = list(values.values()), list(reference.values())
    return difference, math.sqrt(_sd(a) ** 2 / len(a) + _sd(b) ** 2 / len(b))


def report(result: dict[str, Any]) -> str:
    """``results.md``: the runs against the baseline, each sweep, and the data set's own rows, with the budget,
    evaluation settings and hardware."""
    from pipeline.evaluation.metrics import markdown_table

    budget = ", ".join(f"{v} {k}" for k, v in result["budget"].items()) or "the base config's"
    ev = result["evaluate"]
    rows = aggregate(result)
    per_run = {run: [r for r in result["rows"] if r.get("run") == run and "seed" in r] for run in dict.fromkeys(r["run"] for r in rows)}
    own = [{**row, **_run_costs(per_run[row["run"]])} for row in rows if not row["sweeps"]]
    sections = [
        f"# Study `{result['set']}`\n",
        f"Budget: {budget} per run; seeds {result['seeds']}; {ev['per_class']} samples per class per seed, "
        f"metrics {', '.join(ev['metrics'])}; hardware: {result['hardware']}; "
        f"{result['work_s'] / 60:.0f} min of training and scoring in all.\n",
        _uncertainty(len(result["seeds"])),
        f"## Every run at its own sampling settings, against `{result['baseline']}`\n",
        _table(own, ("final_loss", "train_s", "params_M")),
    ]
    for name, sweep in result["sweeps"].items():
        against = ", ".join(f"{k} {v}" for k, v in sweep["against"].items())
        reference = f"the same run with {against}" if against else f"`{sweep.get('reference') or result['baseline']}` sampled the same way"
        sections += [f"## Sweep `{name}`: {', '.join(f'{k} {v}' for k, v in sweep['sample'].items())}; Δ against {reference}\n",
                     _table([row for row in rows if name in row["sweeps"]], ())]
    data_rows = [row for row in result["rows"] if "seed" not in row]
    sections += ["## The data set's own rows (the seed's Table 2 baselines)\n", markdown_table(data_rows, tuple(REPORTED), first="run")]
    return "\n".join(sections)


# Student's t at 97.5 %, by degrees of freedom: how many standard errors a 95 % test of a mean needs.
_T_975 = {1: 12.7, 2: 4.3, 3: 3.2, 4: 2.8, 5: 2.6}


def _uncertainty(seeds: int) -> str:
    """The report's sentence on what its ± and Δ mean for this many seeds."""
    if seeds == 1:
        return ("One seed: each cell is a single measurement (± n/a) and Δ the plain difference from the row's "
                "reference, with no standard error, so no difference is marked; seed-to-seed spread is not measured.\n")
    needed = f" (that needs ~{_T_975[seeds - 1]} SE)" if seeds - 1 in _T_975 else ""
    return ("Each cell is the mean ± standard deviation over seeds. Δ is the difference from the row's reference ± its "
            "standard error (paired over seeds within a run, Welch's between runs); **bold** where it exceeds two standard "
            f"errors. With {seeds} seeds, two standard errors is a screen, not a test at 95 %{needed}.\n")


def _run_costs(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean final loss and training seconds over a run's seeds, and its parameter count."""
    losses = [m["final_loss"] for m in members if m.get("final_loss") is not None]
    return {"final_loss": statistics.fmean(losses) if losses else None, "train_s": statistics.fmean(m["train_s"] for m in members),
            "params_M": members[0].get("params_M")}


def _table(rows: list[dict[str, Any]], extra: tuple[str, ...]) -> str:
    """Aggregated rows as Markdown: run, sampling, seeds, then each metric and its Δ, then ``extra`` columns."""
    metrics = [m for m in REPORTED if any(m in row for row in rows)]
    header = ["run", "sampling", "seeds"]
    for metric in metrics:
        header += [metric, f"Δ {metric}"] if any(f"delta_{metric}" in row for row in rows) else [metric]
    header += [*extra, "reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["run"], row["variant"], str(row["seeds"])]
        for metric in metrics:
            mean, sd = row.get(metric, (None, None))
            cells.append("n/a" if mean is None else f"{_number(mean)} ± {_number(sd)}")
            if f"Δ {metric}" in header:
                cells.append(_delta(row.get(f"delta_{metric}")))
        cells += [_number(row.get(column)) for column in extra]
        cells.append(row.get("reference", ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _delta(delta: tuple[float, float] | None) -> str:
    if delta is None:
        return ""
    difference, error = delta
    text = f"{difference:+.3f} ± {_number(error)}" if abs(difference) < 10 else f"{difference:+.1f} ± {_number(error)}"
    return f"**{text}**" if not math.isnan(error) and abs(difference) > 2 * error else text


def draw(study_set: StudySet, first_seed: dict[str, tuple[Path, Config]], result: dict[str, Any], out: Path) -> None:
    """From each run's first seed: loss curves, a sample grid per run, the image sweep of every guidance sweep, and
    the forward and reverse processes; from every seed: the guidance trade-off (accuracy against the distance)."""
    from pipeline import figures
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

    figures.loss_curves({f"{run}-s{study_set.seeds[0]}": run_dir for run, (run_dir, _) in first_seed.items()}, out / "loss.png")
    pipes = {run: ConditionalDiffusionPipeline.from_pretrained(str(run_dir / "pipeline")) for run, (run_dir, _) in first_seed.items()}
    for run, (_, cfg) in first_seed.items():
        figures.class_grid(pipes[run], out / f"samples-{run}.png", per_class=8, sample=cfg.sample, seed=0,
                           title=f"{run} (seed {study_set.seeds[0]})")
    distance = next((m for m in ("cfid", "fid") if m in study_set.evaluate.metrics), None)
    tradeoff: dict[str, list[tuple[float, float, float]]] = {}
    for name, sweep in study_set.sweeps.items():
        if len(sweep.sample.get("guidance_scale", [])) < 2:
            continue
        run = sweep.runs[0]
        settings = sweep.settings(first_seed[run][1].sample)
        figures.guidance_sweep(pipes[run], out / f"guidance-{name}.png", scales=[s.guidance_scale for s in settings],
                               sample=settings[0], seed=0)
        for row in result["rows"]:
            if name in row.get("sweeps", ()) and distance in row and "accuracy" in row:
                tradeoff.setdefault(f"{name}: {row['run']}", []).append((row["sample"]["guidance_scale"], row[distance], row["accuracy"]))
    if tradeoff:
        figures.guidance_tradeoff(tradeoff, out / "tradeoff.png", distance)
    run_dir, cfg = next(iter(first_seed.values()))
    figures.reverse_process(pipes[next(iter(pipes))], out / "reverse.png", cfg.sample)
    figures.forward_noising(figures.class_examples(cfg.data.dataset), out / "forward.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True, help="a set in configs/experiments (mnist, cifar10-cpu, cifar10, datasets) or a YAML path")
    parser.add_argument("--budget-steps", type=int, help="override the set's budget: optimizer steps per run")
    parser.add_argument("--budget-minutes", type=float, help="override the set's budget: wall minutes per run")
    parser.add_argument("--seeds", help="comma list, overrides the set's")
    parser.add_argument("--runs", help="comma list of runs to do (default: all of the set)")
    parser.add_argument("--per-class", type=int, help="override the set's evaluation samples per class")
    parser.add_argument("--dataset", help="train and evaluate every run on this data set (a local path or hub id)")
    parser.add_argument("--out", help="results and figures (default docs/study/<set>)")
    parser.add_argument("--runs-dir", help="training outputs (default runs/study/<set>)")
    parser.add_argument("--launcher", default=f"{shlex.quote(sys.executable)}", help="how to start train.py (e.g. 'accelerate launch ...')")
    parser.add_argument("--report-only", action="store_true", help="no training: evaluate (what is not yet) and draw the finished runs")
    args = parser.parse_args(argv)
    try:
        study_set = load_set(args.set)
        if args.budget_steps or args.budget_minutes:
            study_set.budget = Budget(steps=args.budget_steps) if args.budget_steps else Budget(minutes=args.budget_minutes)
        if args.per_class:
            study_set.evaluate.per_class = args.per_class
        if args.seeds:
            study_set.seeds = [int(s) for s in args.seeds.split(",")]
        if args.runs:
            narrow(study_set, args.runs.split(","))
        out = Path(args.out or PROJECT_ROOT / "docs" / "study" / study_set.name)
        runs_dir = Path(args.runs_dir or PROJECT_ROOT / "runs" / "study" / study_set.name)
        study(study_set, out, runs_dir, args.launcher, args.report_only, args.dataset)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
