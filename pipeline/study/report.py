"""What a study writes for readers: ``results.md`` (``markdown_report``, from the rows of ``results.json`` alone, so
a report can be regenerated without the runs) and the figures (``draw_figures``, from the trained runs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.names import COLUMNS
from pipeline.study.statistics import aggregate, run_costs

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.study.sets import StudySet


def markdown_report(result: dict[str, Any]) -> str:
    """``results.md``: the runs against the baseline, each sweep, and the data set's own rows, with the budget,
    evaluation settings and hardware."""
    from pipeline.evaluation.metrics import markdown_table  # here, not above: that module loads torch

    budget = ", ".join(f"{v} {k}" for k, v in result["budget"].items()) or "the base config's"
    ev = result["evaluate"]
    rows = aggregate(result)
    per_run = {run: [r for r in result["rows"] if r.get("run") == run and "seed" in r] for run in dict.fromkeys(r["run"] for r in rows)}
    own = [{**row, **run_costs(per_run[row["run"]])} for row in rows if not row["sweeps"]]
    sections = [
        f"# Study `{result['set']}`\n",
        f"Budget: {budget} per run; seeds {result['seeds']}; {ev['per_class']} samples per class per seed, "
        f"metrics {', '.join(ev['metrics'])}; hardware: {result['hardware']}; "
        f"{result['work_s'] / 60:.0f} min of training and scoring in all.\n",
        _uncertainty(len(result["seeds"])),
        *_left_out(result.get("left_out", {})),
        f"## Every run at its own sampling settings, against `{result['baseline']}`\n",
        _table(own, ("final_loss", "train_s", "params_M")),
    ]
    for name, sweep in result["sweeps"].items():
        against = ", ".join(f"{k} {v}" for k, v in sweep["against"].items())
        reference = f"the same run with {against}" if against else f"`{sweep.get('reference') or result['baseline']}` sampled the same way"
        sections += [f"## Sweep `{name}`: {', '.join(f'{k} {v}' for k, v in sweep['sample'].items())}; Δ against {reference}\n",
                     _table([row for row in rows if name in row["sweeps"]], ())]
    data_rows = [row for row in result["rows"] if "seed" not in row]
    sections += ["## The data set's own rows (the seed's Table 2 baselines)\n", markdown_table(data_rows, tuple(COLUMNS), first="run")]
    return "\n".join(sections)


def _left_out(left_out: dict[str, str]) -> list[str]:
    """The report's list of the runs it leaves out (``--report-only``: not trained yet, or trained with another config
    than the set's), each with its reason; nothing when every run is in."""
    if not left_out:
        return []
    lines = [f"- `{run}`: {reason}" for run, reason in left_out.items()]
    return ["**Left out of this report** (the tables and means are over the other runs):\n", "\n".join(lines) + "\n"]


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


def _table(rows: list[dict[str, Any]], extra: tuple[str, ...]) -> str:
    """Aggregated rows as Markdown: run, sampling, seeds, then each metric and its Δ, then ``extra`` columns."""
    metrics = [m for m in COLUMNS if any(m in row for row in rows)]
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


def draw_figures(study_set: StudySet, first_seed: dict[str, tuple[Path, Config]], result: dict[str, Any], out: Path) -> None:
    """From each run's first seed: loss curves, a sample grid per run, the image sweep of every guidance sweep, and
    the forward and reverse processes; from every seed: the guidance trade-off (accuracy against the distance)."""
    from pipeline import figures  # here, not above: matplotlib and torch load only when figures are drawn
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
    _, cfg = next(iter(first_seed.values()))
    figures.reverse_process(pipes[next(iter(pipes))], out / "reverse.png", cfg.sample)
    figures.forward_noising(figures.class_examples(cfg.data.dataset), out / "forward.png")
