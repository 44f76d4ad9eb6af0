"""The model card's section on a distilled student (``distill.teacher``, ``python -m pipeline.distill``): the teacher
with the numbers its own card measured, the method, what the distillation cost and what sampling with the student
saves in U-Net evaluations."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config, SampleConfig, load_config
from pipeline.markdown import code_span
from pipeline.names import COLUMNS
from pipeline.sample_flags import run_config_file
from pipeline.tensorboard_logs import training_minutes

METHODS = {
    "consistency": "LCM-style consistency distillation (Luo et al. 2023): on the teacher's {teacher_steps}-step DDIM grid, "
                   "one guided teacher step gives the target of the student's consistency function, so `LCMScheduler` "
                   "samples it in 1 to {teacher_steps} steps",
    "segment": "one round of guided progressive distillation (Salimans & Ho 2022, Meng et al. 2023): each step of DDIM's "
               "{steps}-step grid is trained to land where {per_step} guided teacher DPM-Solver++(2M) steps land, so "
               "`DDIMScheduler` "
               "samples it in {steps} steps",
}


def teacher_evaluations(cfg: Config) -> int:
    """Teacher U-Net evaluations per training image of a distillation run: two (conditional and null) per guided step."""
    steps = 1 if cfg.distill.method == "consistency" else cfg.distill.teacher_steps // cfg.sample.num_inference_steps
    return 2 * steps


def sampling_evaluations(sample: SampleConfig, student: bool) -> int:
    """U-Net evaluations per image of sampling with ``sample``: one per step for a student, two for a guided teacher."""
    return sample.num_inference_steps * (1 if student or sample.guidance_scale == 1 else 2)


def teacher_measured(teacher: Path) -> str:
    """What the teacher's card measured (its ``metrics.json``), in words, or that it has none."""
    try:
        result = json.loads((teacher / "metrics.json").read_text())
        row = next(row for row in result["rows"] if row["name"] == "model")
        sample, n = SampleConfig(**result["sample"]), int(row["n"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return "Its folder holds no measured numbers (`metrics.json`)."
    values = ", ".join(f"{column} {row[column]:.4g}" for column in COLUMNS if column in row)
    return (f"Its card measured {values} on N = {n:,} samples ({sample.sampler}, {sample.num_inference_steps} "
            f"steps, {sample.guidance_text()}).")


def distillation_lines(cfg: Config, step: int, run_dir: Path) -> list[str]:
    """The card's ``## Distillation`` section for the student trained by ``cfg`` for ``step`` steps in ``run_dir``."""
    distill, sample = cfg.distill, cfg.sample
    teacher = Path(str(distill.teacher))
    teacher_config = run_config_file(teacher)
    teacher_sample = load_config(teacher_config).sample if teacher_config else None
    minutes = max(training_minutes(run_dir / "tensorboard").values(), default=None) if (run_dir / "tensorboard").is_dir() else None
    method = METHODS[distill.method].format(teacher_steps=distill.teacher_steps, steps=sample.num_inference_steps,
                                            per_step=distill.teacher_steps // sample.num_inference_steps)
    student_cost = sampling_evaluations(sample, student=True)
    saving = (f" The teacher's own sampling ({teacher_sample.sampler}, {teacher_sample.num_inference_steps} steps, "
              f"{teacher_sample.guidance_text()}) takes {sampling_evaluations(teacher_sample, student=False)}: "
              f"{sampling_evaluations(teacher_sample, student=False) / student_cost:.0f}x more." if teacher_sample else "")
    return [
        "## Distillation", "",
        f"A few-step student of the teacher pipeline {code_span(str(teacher))}, whose weights it started from. "
        + teacher_measured(teacher), "",
        f"- Method: {method} (`distill.method {distill.method}`, `pipeline/distillation.py`).",
        f"- Guidance: the scale s is an input of the U-Net (a zero-initialised embedding added to the time embedding), "
        f"trained on s uniform in [{distill.guidance_range[0]:g}, {distill.guidance_range[1]:g}]: one U-Net evaluation per "
        "step at any s, where the teacher runs two (conditional and null).",
        f"- Cost: {step} optimizer steps of {cfg.train.batch_size} images, "
        + (f"{minutes:.1f} minutes of training" if minutes is not None else "training time not recorded with this copy")
        + f", {teacher_evaluations(cfg)} teacher U-Net evaluations per training image.",
        f"- Sampling: {student_cost} U-Net evaluations per image at {sample.num_inference_steps} steps.{saving}",
    ]
