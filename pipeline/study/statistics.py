"""The study's numbers over seeds: means, standard deviations, differences against a reference with their standard
errors, and what the runs cost. Standard library only; reads the rows of ``results.json``.

A model row is one (run, seed, sampling settings) with a value per metric column (``pipeline.names.COLUMNS``);
``aggregate`` folds the seeds of each (run, sampling settings) into one row, as the report tabulates it.
"""

from __future__ import annotations

import json
import math
import statistics  # the standard library's: imports are absolute, so not this module
from typing import Any

from pipeline.names import COLUMNS


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
        for metric in COLUMNS:
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


def run_costs(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean final loss and training seconds over a run's seeds, and its parameter count."""
    losses = [m["final_loss"] for m in members if m.get("final_loss") is not None]
    return {"final_loss": statistics.fmean(losses) if losses else None, "train_s": statistics.fmean(m["train_s"] for m in members),
            "params_M": members[0].get("params_M")}


def work_seconds(rows: list[dict[str, Any]]) -> float:
    """What the study's results cost, however many sessions and reports they took: each run's training once, and
    every evaluation's wall time (``wall_s`` of one command alone says little when most came from the cache)."""
    training = {(row["run"], row["seed"]): row["train_s"] for row in rows if "seed" in row}
    return sum(training.values()) + sum(row.get("wall_s") or 0 for row in rows)
