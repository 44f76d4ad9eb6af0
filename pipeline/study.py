"""Run one of the seed's comparisons end to end: train every variant, evaluate, tabulate, draw.

    python -m pipeline.study --set mnist                        # configs/experiments/mnist.yaml, on this machine
    python -m pipeline.study --set mnist --budget-steps 500 --seeds 0,1 --runs baseline,cosine
    python -m pipeline.study --set cifar10 --launcher "accelerate launch --num_processes 8"
    python -m pipeline.study --set mnist --report-only          # re-tabulate and redraw finished runs

A set file (``configs/experiments/<set>.yaml``) names a base config, a budget (``steps`` or ``minutes``),
seeds, evaluation settings, an optional guidance sweep and its runs; each run is a list of overlays, names
of ``configs/experiments/overlays/<name>.yaml`` or inline ``{section: {key: value}}`` mappings, applied
in order on the base. Runs go to ``runs/study/<set>/<run>-s<seed>/`` and are skipped when already trained
with the same config (so an interrupted study resumes). The output directory gets ``results.json``,
``results.md`` (metrics, final loss, wall time, budget, hardware) and the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.config import PROJECT_ROOT, Config, ConfigError, DataConfig, decode, load_config, read_yaml
from pipeline.evaluation.metrics import METRICS
from pipeline.sampling import Precision

EXPERIMENTS = PROJECT_ROOT / "configs" / "experiments"
MetricName = Literal[METRICS]  # type: ignore[valid-type]


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
class GuidanceSweep:
    """The guidance scales to sample one run at, besides its own; no run means no sweep."""

    run: str | None = None
    scales: tuple[float, ...] = ()


@dataclass
class StudySet:
    """A set file's contents, decoded by ``pipeline.config.decode``; ``name`` is the file's stem and ``load_set``
    turns each run's overlays (names or inline mappings) into ``{"section.key": value}`` dicts."""

    name: str
    base: Path  # relative to the project root
    runs: dict[str, list[Any]]
    budget: Budget = field(default_factory=Budget)
    seeds: list[int] = field(default_factory=lambda: [0])
    evaluate: Evaluation = field(default_factory=Evaluation)
    guidance_sweep: GuidanceSweep = field(default_factory=GuidanceSweep)


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
    study_set.runs = {run: [load_overlay(item, f"{path}: run {run}") for item in items] for run, items in study_set.runs.items()}
    if study_set.guidance_sweep.run not in (None, *study_set.runs):
        raise ConfigError(f"{path}: guidance_sweep.run {study_set.guidance_sweep.run!r} is not one of the runs {', '.join(study_set.runs)}")
    return study_set


def run_config(study: StudySet, run: str, seed: int, runs_dir: Path) -> Config:
    """The full config of one run: base, overlays, budget and seed, validated."""
    overrides: dict[str, Any] = {}
    for overlay in study.runs[run]:
        overrides.update(overlay)
    if study.budget.steps is not None:
        overrides["train.max_steps"] = study.budget.steps
    if study.budget.minutes is not None:  # the base's max_steps stays as a cap (and the length of its LR schedule)
        overrides["train.max_minutes"] = study.budget.minutes
    overrides.update({"train.seed": seed, "train.output_dir": str(runs_dir / f"{run}-s{seed}")})
    return load_config(PROJECT_ROOT / study.base, overrides)


def train_run(cfg: Config, launcher: str) -> float:
    """Train ``cfg`` in a subprocess unless its output already holds a pipeline trained with this exact
    config. Returns the training wall time in seconds (the recorded one when skipped)."""
    out = Path(cfg.train.output_dir)
    record = out / "study-run.json"
    wanted = cfg.to_dict()
    if record.is_file() and (out / "pipeline").is_dir():
        done = json.loads(record.read_text())
        if done["config"] == json.loads(json.dumps(wanted)):
            print(f"[study] {out.name}: already trained, skipping", flush=True)
            return done["train_s"]
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "study-config.yaml")
    command = [*shlex.split(launcher), str(PROJECT_ROOT / "pipeline" / "train.py"), "--config", str(out / "study-config.yaml")]
    print(f"[study] {out.name}: {' '.join(command)}", flush=True)
    started = time.time()
    code = subprocess.call(command, env={**os.environ, "TQDM_DISABLE": "1"})
    train_s = time.time() - started
    if code not in (0, 75) or not (out / "pipeline").is_dir():  # 75: stopped at max_minutes, pipeline exported
        raise RuntimeError(f"training {out} failed with exit status {code}")
    record.write_text(json.dumps({"config": wanted, "train_s": train_s, "exit": code}, indent=2) + "\n")
    return train_s


def final_loss(run_dir: Path, last: int = 5) -> float | None:
    """Mean of the last ``last`` logged ``train/loss`` values (a loss at one step is too noisy)."""
    from pipeline.tensorboard_logs import read_scalars

    steps, values = read_scalars(run_dir, "train/loss")
    return float(sum(values[-last:]) / len(values[-last:])) if values else None


def study(study_set: StudySet, out: Path, runs_dir: Path, launcher: str, report_only: bool = False) -> dict[str, Any]:
    """Train (unless ``report_only``), evaluate and draw every run of ``study_set``; write results to ``out``."""
    from pipeline.evaluation.metrics import Evaluator, evaluate, hardware
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

    ev = study_set.evaluate
    evaluators: dict[str, Evaluator] = {}
    rows, pipelines = [], {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for run in study_set.runs:
        for seed in study_set.seeds:
            cfg = run_config(study_set, run, seed, runs_dir)
            run_dir = Path(cfg.train.output_dir)
            if report_only:
                train_s = json.loads((run_dir / "study-run.json").read_text())["train_s"]
            else:
                train_s = train_run(cfg, launcher)
            dataset = cfg.data.dataset
            if dataset not in evaluators:
                reference = DataConfig(dataset=dataset, split="train", max_samples=None if ev.ref_samples == "all" else ev.ref_samples)
                evaluators[dataset] = Evaluator(dataset, ev.metrics, reference=reference, device=device)
            pipe = ConditionalDiffusionPipeline.from_pretrained(str(run_dir / "pipeline")).to(device)
            pipelines[(run, seed)] = (pipe, cfg)
            scales = study_set.guidance_sweep.scales if study_set.guidance_sweep.run == run else ()
            for scale in [cfg.sample.guidance_scale, *[s for s in scales if s != cfg.sample.guidance_scale]]:
                sample = dataclasses.replace(cfg.sample, guidance_scale=scale)  # the run's interval and ramp stay
                result = evaluate(pipe, evaluators[dataset], ev.per_class, sample, ev.seed, mixed_precision=ev.mixed_precision,
                                  baselines=False)
                row = {k: v for k, v in result["rows"][0].items() if k != "name"}
                rows.append({"run": run, "seed": seed, "guidance": scale, **row, "final_loss": final_loss(run_dir),
                             "train_s": round(train_s, 1), "params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 3),
                             "dataset": dataset})
                shown = {k: v for k, v in rows[-1].items() if k != "per_class_accuracy"}
                print(f"[study] {run}-s{seed} guidance {scale}: {json.dumps(shown)}", flush=True)
    for dataset, evaluator in evaluators.items():
        for row in evaluate(None, evaluator, ev.per_class, seed=ev.seed)["rows"]:
            rows.append({"run": row.pop("name"), "dataset": dataset, **row})
    budget = {key: value for key, value in dataclasses.asdict(study_set.budget).items() if value is not None}
    result = {"set": study_set.name, "budget": budget, "seeds": study_set.seeds, "evaluate": dataclasses.asdict(ev),
              "hardware": hardware(), "launcher": launcher.replace(shlex.quote(sys.executable), "python"),  # no machine path in results
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(report(result))
    draw(study_set, pipelines, runs_dir, out)
    return result


def report(result: dict[str, Any]) -> str:
    """The comparison table with its budget, evaluation settings and hardware."""
    from pipeline.evaluation.metrics import COLUMNS, markdown_table

    budget = ", ".join(f"{v} {k}" for k, v in result["budget"].items()) or "the base config's"
    ev = result["evaluate"]
    rows = [{**row, "run": f"{row['run']} (s={row['guidance']})" if "guidance" in row else row["run"]} for row in result["rows"]]
    table = markdown_table(rows, (*COLUMNS, "final_loss", "train_s", "params_M"), first="run")
    return (
        f"# Study `{result['set']}`\n\nBudget: {budget} per run; seeds {result['seeds']}; hardware: {result['hardware']}.\n"
        f"Evaluation: {ev.get('per_class', 20)} samples per class, metrics {', '.join(ev.get('metrics', []))}; "
        "s = guidance scale; the last rows are the data set's baselines.\n\n" + table
    )


def draw(study_set: StudySet, pipelines: dict, runs_dir: Path, out: Path) -> None:
    """Loss curves of all runs, a sample grid per run, the guidance sweep, and, for the first run, the forward
    process under both schedules and its reverse process."""
    from pipeline import figures

    figures.loss_curves({f"{run}-s{seed}": runs_dir / f"{run}-s{seed}" for run, seed in pipelines}, out / "loss.png")
    for (run, seed), (pipe, cfg) in pipelines.items():
        figures.class_grid(pipe, out / f"samples-{run}-s{seed}.png", per_class=8, sample=cfg.sample, seed=0,
                           title=f"{run} (seed {seed})")
    sweep = study_set.guidance_sweep
    if sweep.run is not None:
        pipe, cfg = pipelines[(sweep.run, study_set.seeds[0])]
        figures.guidance_sweep(pipe, out / "guidance.png", scales=sweep.scales, sample=cfg.sample, seed=0)
    pipe, cfg = next(iter(pipelines.values()))
    figures.reverse_process(pipe, out / "reverse.png", cfg.sample)
    figures.forward_noising(figures.class_examples(cfg.data.dataset), out / "forward.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True, help="a set in configs/experiments (mnist, cifar10, datasets) or a YAML path")
    parser.add_argument("--budget-steps", type=int, help="override the set's budget: optimizer steps per run")
    parser.add_argument("--budget-minutes", type=float, help="override the set's budget: wall minutes per run")
    parser.add_argument("--seeds", help="comma list, overrides the set's")
    parser.add_argument("--runs", help="comma list of runs to do (default: all of the set)")
    parser.add_argument("--per-class", type=int, help="override the set's evaluation samples per class")
    parser.add_argument("--out", help="results and figures (default docs/study/<set>)")
    parser.add_argument("--runs-dir", help="training outputs (default runs/study/<set>)")
    parser.add_argument("--launcher", default=f"{shlex.quote(sys.executable)}", help="how to start train.py (e.g. 'accelerate launch ...')")
    parser.add_argument("--report-only", action="store_true", help="no training: evaluate and draw the finished runs")
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
            chosen = args.runs.split(",")
            if unknown := [r for r in chosen if r not in study_set.runs]:
                raise ConfigError(f"unknown run(s) {', '.join(unknown)}; the set has {', '.join(study_set.runs)}")
            study_set.runs = {r: study_set.runs[r] for r in chosen}
            if study_set.guidance_sweep.run not in study_set.runs:
                study_set.guidance_sweep = GuidanceSweep()
        out = Path(args.out or PROJECT_ROOT / "docs" / "study" / study_set.name)
        runs_dir = Path(args.runs_dir or PROJECT_ROOT / "runs" / "study" / study_set.name)
        study(study_set, out, runs_dir, args.launcher, args.report_only)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
