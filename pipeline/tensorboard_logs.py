"""Reading a run's TensorBoard event files: scalars by tag and step, and the wall-clock minutes of training."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(run_dir: str | Path, tag: str = "train/loss") -> tuple[list[int], list[float]]:
    """Steps and values of a scalar from every TensorBoard event file under ``run_dir`` (sorted by step)."""
    points = scalar_points(run_dir).get(tag, {})
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def scalar_points(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar of every TensorBoard event file under ``run_dir``: tag -> {step: value}."""
    points: dict[str, dict[int, float]] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            points.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return points


def training_minutes(run_dir: str | Path, tag: str = "train/loss") -> dict[int, float]:
    """Step -> wall-clock minutes of training up to it, summed over the run's starts (each resume writes a new
    event file; the time between a stop and the next start is not counted), from the events of ``tag``."""
    minutes: dict[int, float] = {}
    before = 0.0
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag not in accumulator.Tags()["scalars"]:
            continue
        scalars = accumulator.Scalars(tag)
        start = accumulator.FirstEventTimestamp()
        minutes.update({e.step: before + (e.wall_time - start) / 60 for e in scalars})
        before += (scalars[-1].wall_time - start) / 60
    return minutes
