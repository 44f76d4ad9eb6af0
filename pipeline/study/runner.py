"""Running a study: every run of a set trained on every seed (or found trained), evaluated at its own sampling
settings and its sweeps' (or found evaluated), then ``results.json``, ``results.md`` and the figures written.

Runs go to ``<runs_dir>/<run>-s<seed>/`` and are skipped when already trained with the same config; a start cut
off mid-run is continued from its latest checkpoint; every evaluation is kept beside its run (``evaluations/``), so
an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpointing import list_checkpoints
from pipeline.config import Config, DataConfig, SampleConfig, decode, load_config
from pipeline.errors import ConfigError
from pipeline.evaluation.classifier import ClassifierNotFound, classifier_dir
from pipeline.evaluation.metrics import Evaluator, classifier_name, evaluate, hardware
from pipeline.names import PROJECT_ROOT
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.study.report import draw_figures, markdown_report
from pipeline.study.sets import Evaluation, StudySet
from pipeline.study.statistics import work_seconds
from pipeline.tensorboard_logs import read_scalars

STUDY_PROGRESS = "study-progress.json"  # a start under way: its config, start time and earlier starts' seconds
EVALUATIONS = "evaluations"  # a run's cached evaluations, one JSON file per setting


def run_config(study_set: StudySet, run: str, seed: int, runs_dir: Path, dataset: str | None = None) -> Config:
    """The full config of one run: base, overlays, budget and seed (and ``dataset``, when given), validated."""
    overrides: dict[str, Any] = {}
    for overlay in study_set.runs[run]:
        overrides.update(overlay)
    if dataset is not None:
        overrides["data.dataset"] = dataset
    if study_set.budget.steps is not None:
        overrides["train.max_steps"] = study_set.budget.steps
    if study_set.budget.minutes is not None:  # the base's max_steps stays as a cap (and the length of its LR schedule)
        overrides["train.max_minutes"] = study_set.budget.minutes
    overrides.update({"train.seed": seed, "train.output_dir": str(runs_dir / f"{run}-s{seed}")})
    return load_config(PROJECT_ROOT / study_set.base, overrides)


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
    if code == 2:  # bad input, which the trainer has just explained in one line
        raise ConfigError(f"training {out} refused its config (exit status 2, the error above); fix the set and run the study again")
    if code not in (0, 75) or not (out / "pipeline").is_dir():  # 75: stopped at max_minutes, pipeline exported
        raise RuntimeError(f"training {out} failed with exit status {code}")
    record.write_text(json.dumps({"config": wanted, "train_s": train_s, "exit": code, "starts": starts}, indent=2) + "\n")
    progress_file.unlink()
    return train_s


def same_config(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a recorded config is ``wanted`` (a JSON-normalised ``Config.to_dict()``)."""
    return not config_differences(recorded, wanted)


def config_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``section.key: trained with A, the set now says B`` for each key in which a recorded config differs from
    ``wanted`` (a JSON-normalised ``Config.to_dict()``). A key added to the config since the record was written reads
    as its default, which is what that run trained with; ``train.output_dir`` names where the run is, not what it
    trained, so a run directory moved elsewhere is the same run."""
    try:
        trained = json.loads(json.dumps(decode(Config, recorded).to_dict()))
    except ConfigError as error:  # a key since removed or renamed: another config
        return [f"the recorded config no longer reads ({error})"]
    return [f"{section}.{key}: trained with {json.dumps(trained[section][key])}, the set now says {json.dumps(value)}"
            for section, values in wanted.items() for key, value in values.items()
            if trained[section][key] != value and (section, key) != ("train", "output_dir")]


def left_out_because(cfg: Config) -> str | None:
    """For ``--report-only``: why the run ``cfg`` describes cannot be reported (not trained yet; trained with another
    config than the set's now, naming the keys), also printed (the second on stderr: the set and its run disagree),
    or None when its recorded training is this config's."""
    out = Path(cfg.train.output_dir)
    record = out / "study-run.json"
    if not record.is_file() or not (out / "pipeline").is_dir():
        print(f"[study] {out.name}: not trained yet, left out of the report", flush=True)
        return "not trained yet"
    if differences := config_differences(json.loads(record.read_text())["config"], json.loads(json.dumps(cfg.to_dict()))):
        reason = f"trained with another config than the set's ({'; '.join(differences)})"
        print(f"[study] {out.name}: {reason}; left out of the report (run the study without --report-only to train it "
              "again)", file=sys.stderr, flush=True)
        return reason
    return None


def final_loss(run_dir: Path, last: int = 5) -> float | None:
    """Mean of the last ``last`` logged ``train/loss`` values (a loss at one step is too noisy)."""
    _, values = read_scalars(run_dir, "train/loss")
    return float(sum(values[-last:]) / len(values[-last:])) if values else None


def variant(sample: SampleConfig, own: SampleConfig) -> str:
    """A short name for sampling settings: the sampler and steps where they differ from the run's own, then the
    guidance (``ddpm 100 steps, s=3, increasing ramp``)."""
    steps = [] if (sample.sampler, sample.num_inference_steps) == (own.sampler, own.num_inference_steps) else [
        f"{sample.sampler} {sample.num_inference_steps} steps"]
    return ", ".join([*steps, sample.guidance_text(compact=True)])


def _frozen(sample: SampleConfig) -> tuple:
    """Hashable sampling settings (lists, e.g. an interval, as tuples)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(sample).items())


def reference_data(dataset: str, ev: Evaluation) -> DataConfig:
    """The training images the distances are measured against."""
    return DataConfig(dataset=dataset, split="train", max_samples=None if ev.ref_samples == "all" else ev.ref_samples)


def evaluate_run(study_set: StudySet, run: str, seed: int, cfg: Config, train_s: float, evaluators: dict[str, Any],
                 device: str) -> list[dict[str, Any]]:
    """The rows of one trained run: at its own sampling settings and at its sweeps', each ``cached`` in the run."""
    ev, run_dir, dataset = study_set.evaluate, Path(cfg.train.output_dir), cfg.data.dataset
    reference = reference_data(dataset, ev)
    settings: dict[tuple, list[str]] = {_frozen(cfg.sample): []}  # each setting once, with the sweeps that ask for it
    for name, sweep in study_set.sweeps.items():
        for sample in sweep.settings(cfg.sample) if run in sweep.runs else []:
            settings.setdefault(_frozen(sample), []).append(name)
    pipe, rows, loss = None, [], final_loss(run_dir)
    weights = {"unet_sha256": files_digest(run_dir / "pipeline" / "unet"), "classifier_sha256": classifier_digest(dataset)}
    for frozen, sweeps in settings.items():
        sample = SampleConfig(**dict(frozen))
        key = {"dataset": dataset, "reference": dataclasses.asdict(reference), "per_class": ev.per_class, "seed": ev.seed,
               "metrics": list(ev.metrics), "mixed_precision": ev.mixed_precision, "sample": dataclasses.asdict(sample), **weights}

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
    if dataset not in evaluators:
        evaluators[dataset] = Evaluator(dataset, ev.metrics, reference=reference_data(dataset, ev), device=device)
    return evaluators[dataset]


def files_digest(folder: Path, pattern: str = "*.safetensors") -> str | None:
    """SHA-256 over the names and contents of the files matching ``pattern`` in ``folder`` (a model's weights), or
    None where there are none."""
    files = sorted(folder.rglob(pattern))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            digest.update(f"{path.relative_to(folder).as_posix()}\0{hashlib.file_digest(handle, 'sha256').hexdigest()}\0".encode())
    return digest.hexdigest()


def classifier_digest(dataset: str) -> str | None:
    """``files_digest`` of the classifier that scores ``dataset`` (the one ``Evaluator`` loads), None where it has none."""
    try:
        return files_digest(classifier_dir(classifier_name(dataset)))
    except ClassifierNotFound:  # only metrics without a classifier can be asked for; the others fail when scored
        return None


def cached(folder: Path, key: dict[str, Any], score: Callable[[], Any]) -> Any:
    """``score()``, kept in ``<folder>/evaluations/`` under a hash of ``key`` (everything that decides the numbers:
    the settings, and the SHA-256 of the model's and the classifier's weights, so that weights replaced behind the
    study's back are scored again) and read from there when present."""
    path = folder / EVALUATIONS / f"{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())["row"]
    row = score()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps({"key": key, "row": row}, indent=2) + "\n")
    path.with_suffix(".tmp").replace(path)  # whole or absent, so an interrupted study never reads half a file
    return row


def run_study(study_set: StudySet, out: Path, runs_dir: Path, launcher: str, report_only: bool = False,
              dataset: str | None = None) -> dict[str, Any]:
    """Train (unless ``report_only``), evaluate and draw every run of ``study_set`` on every seed; write the results
    to ``out``."""
    ev = study_set.evaluate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluators: dict[str, Any] = {}
    rows, first_seed, left_out = [], {}, {}
    started = time.time()
    for run in study_set.runs:
        for seed in study_set.seeds:
            # Train the run (or find it trained), then evaluate it (or find its evaluations).
            cfg = run_config(study_set, run, seed, runs_dir, dataset)
            if report_only:
                if reason := left_out_because(cfg):
                    left_out[f"{run}-s{seed}"] = reason
                    continue
                train_s = json.loads((Path(cfg.train.output_dir) / "study-run.json").read_text())["train_s"]
            else:
                train_s = train_run(cfg, launcher)
            rows += evaluate_run(study_set, run, seed, cfg, train_s, evaluators, device)
            first_seed.setdefault(run, (Path(cfg.train.output_dir), cfg))
    if not first_seed:
        raise ConfigError(f"no run of set {study_set.name!r} is trained with the set's config, so there is nothing to report: "
                          "run the study without --report-only")
    # The data sets' own rows (the seed's Table 2): uniform noise and real test images, scored the same way.
    for data in dict.fromkeys(row["dataset"] for row in rows):
        key = {"dataset": data, "reference": dataclasses.asdict(reference_data(data, ev)), "per_class": ev.per_class,
               "seed": ev.seed, "metrics": list(ev.metrics), "baselines": True, "classifier_sha256": classifier_digest(data)}
        for row in cached(runs_dir, key, lambda data=data: evaluate(None, evaluator(evaluators, data, ev, device), ev.per_class,
                                                                     seed=ev.seed)["rows"]):
            rows.append({"run": row.pop("name"), "dataset": data, **row})
    budget = {key: value for key, value in dataclasses.asdict(study_set.budget).items() if value is not None}
    result = {"set": study_set.name, "budget": budget, "seeds": study_set.seeds, "evaluate": dataclasses.asdict(ev),
              "baseline": study_set.baseline, "sweeps": {name: dataclasses.asdict(s) for name, s in study_set.sweeps.items()},
              "hardware": hardware(), "launcher": launcher.replace(shlex.quote(sys.executable), "python"),  # no machine path in results
              "wall_s": round(time.time() - started, 1), "work_s": round(work_seconds(rows), 1), "left_out": left_out, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown_report(result))
    draw_figures(study_set, first_seed, result, out)
    return result
