"""Distil a trained pipeline into a few-step student that takes the guidance scale as an input.

    python -m pipeline.distill --teacher data/pretrained/cifar10-cpu --out runs/distill-cifar10 [--config FILE.yaml]
        [--section.key value ...] [--resume latest]

The run's config is the teacher's own ``config.yaml`` (inside the pipeline folder, or beside a training run's
``pipeline/``): its model, diffusion, data, train and sample sections. On top of it come the student's sampling (its
method's sampler, ``names.DISTILL_METHODS``, at 4 steps), then the sections of ``--config``, then the overrides, and
last ``train.output_dir`` = ``--out`` and ``distill.teacher`` = ``--teacher``. It trains with the training loop
(``pipeline.training.train``: checkpoints, ``--resume latest``, ``train.max_minutes`` chunks, EMA, the export with its
model card) and has the training command line's exit statuses: 0 done, 75 stopped early with a checkpoint, 3
diverged, 2 with one line for bad input, 1 for a full disk or a crash. The run's ``config.yaml`` repeats it with
``python pipeline/train.py --config OUT/config.yaml``. docs/samplers.md compares the methods.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Config, DistillConfig, config_sections, load_config, parse_overrides
from pipeline.errors import ConfigError
from pipeline.names import DISTILL_METHODS
from pipeline.sample_flags import run_config_file
from pipeline.train import run_command

USAGE = ("usage: python -m pipeline.distill --teacher PIPELINE_DIR --out RUN_DIR [--config FILE.yaml] [--resume latest] "
         "[--section.key value ...]")
STUDENT_STEPS = 4  # the student's default sample.num_inference_steps (the bar: 4 steps)


def yaml_pairs(path: Path) -> dict[str, Any]:
    """A config file's values (``config_sections``: its ``base:`` file's underneath) as ``section.key`` pairs;
    ConfigError for a file that is no mapping of sections."""
    sections = config_sections(path)
    if not all(isinstance(keys, dict) for keys in sections.values()):
        raise ConfigError(f"{path}: expected a mapping of sections, each a mapping of key: value")
    return {f"{section}.{key}": value for section, keys in sections.items() for key, value in keys.items()}


def distill_config_pairs(teacher: str, out: str, config: str | None, overrides: list[str]) -> dict[str, Any]:
    """The ``section.key`` pairs of the run, in the order the module's docstring gives; ConfigError for a teacher that
    is no pipeline folder or has no ``config.yaml``."""
    folder = Path(teacher)
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"--teacher {teacher}: no exported pipeline there (no model_index.json); pass a trained pipeline's "
                          "folder, e.g. runs/quickstart/pipeline or data/pretrained/cifar10-cpu")
    teacher_config = run_config_file(folder)
    if teacher_config is None:
        raise ConfigError(f"--teacher {teacher}: no config.yaml in or beside it; publish the teacher with `python -m "
                          "pipeline.export RUN --out DIR`, which ships it")
    given = (yaml_pairs(Path(config)) if config else {}) | parse_overrides(overrides)
    pairs = {key: value for key, value in yaml_pairs(teacher_config).items() if not key.startswith("distill.")}
    sampler = DISTILL_METHODS.get(given.get("distill.method", DistillConfig().method))
    if sampler is not None:  # else load_config names the valid methods
        pairs |= {"sample.sampler": sampler, "sample.num_inference_steps": STUDENT_STEPS}
    return pairs | given | {"train.output_dir": out, "distill.teacher": teacher}


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, __doc__, USAGE, ("--teacher", "--out", "--config", "--resume"), student_config)


def student_config(known: argparse.Namespace, overrides: list[str]) -> Config:
    """The run's config from the command line's ``--teacher``, ``--out`` and ``--config`` and its overrides."""
    if known.teacher is None or known.out is None:
        raise ConfigError("--teacher and --out are required")
    return load_config(None, distill_config_pairs(known.teacher, known.out, known.config, overrides))


if __name__ == "__main__":
    sys.exit(main())
