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
with the same config; every evaluation is kept beside its run (``evaluations/``, keyed on the weights' SHA-256),
so an interrupted study resumes where it stopped. ``--report-only`` leaves out, and names in the report and on
stderr, each run not trained yet or trained with another config than the set's (with the keys that differ). The
output directory gets ``results.json`` (every seed's row), ``results.md`` (mean ± standard deviation over seeds,
and each difference against its reference with its standard error, in bold where it exceeds two) and the figures.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.names import PROJECT_ROOT
from pipeline.sample_flags import check_positive
from pipeline.study.sets import Budget, load_set, narrow


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.study``: 0 when the results are written, 2 with a one-line error for bad input
    (``ConfigError``); anything else (a failed training, CUDA out of memory, a bug) keeps its traceback."""
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
        check_positive({"--budget-steps": args.budget_steps, "--budget-minutes": args.budget_minutes, "--per-class": args.per_class})
        if args.budget_steps is not None or args.budget_minutes is not None:
            study_set.budget = Budget(steps=args.budget_steps) if args.budget_steps else Budget(minutes=args.budget_minutes)
        if args.per_class is not None:
            study_set.evaluate.per_class = args.per_class
        if args.seeds is not None:
            study_set.seeds = parse_seeds(args.seeds)
        if args.runs:
            narrow(study_set, args.runs.split(","))
        out = Path(args.out or PROJECT_ROOT / "docs" / "study" / study_set.name)
        runs_dir = Path(args.runs_dir or PROJECT_ROOT / "runs" / "study" / study_set.name)
        from pipeline.study.runner import run_study  # torch and the trainer load only once the flags and the set are good

        run_study(study_set, out, runs_dir, args.launcher, args.report_only, args.dataset)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'results.md'}")
    return 0


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct integers >= 0, or a ConfigError."""
    seeds = [s.strip() for s in text.split(",")]
    if not all(s.isdigit() for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0 separated by commas, e.g. 0,1,2; got {text!r}")
    return [int(s) for s in seeds]


if __name__ == "__main__":
    sys.exit(main())
