"""The seed paper's figures as PNG files, from a trained pipeline, its TensorBoard logs, or the schedules alone.

    python -m pipeline.figures forward --dataset data/mnist --out forward.png          # figures 6-7 + alpha_bar(t)
    python -m pipeline.figures reverse --pipeline runs/x/pipeline --out reverse.png    # figures 8-9
    python -m pipeline.figures grid --pipeline runs/x/pipeline --out grid.png          # figures 10-11
    python -m pipeline.figures loss --run runs/x [--run runs/y ...] --out loss.png     # figure 12
    python -m pipeline.figures curve --run runs/x --out curve.png                       # eval/* vs minutes and images
    python -m pipeline.figures guidance --pipeline runs/x/pipeline --scales 1,2,3,5 --out guidance.png
    python -m pipeline.figures time-to-fid --points docs/cifar10-cpu/time-to-fid.csv --out time-to-fid.png
    python -m pipeline.figures all --pipeline runs/x/pipeline --out-dir docs/figures/x # every one of them

Sampling figures take ``--sampler``, ``--steps``, ``--guidance``, ``--guidance-interval``, ``--guidance-ramp``
(``pipeline.sample_flags``; defaults: the run's ``config.yaml`` beside the pipeline, else ``SampleConfig``'s) and
``--seed``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from pipeline.config import DataConfig, DiffusionConfig, SampleConfig, load_config  # noqa: E402
from pipeline.config_decoding import choice_flag  # noqa: E402
from pipeline.diffusion import make_train_scheduler  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline  # noqa: E402
from pipeline.sample_flags import add_sample_flags, flagged_settings, pipeline_location  # noqa: E402
from pipeline.sampling import sample_images, saved_run_config  # noqa: E402
from pipeline.tensorboard_logs import read_scalars, training_minutes  # noqa: E402

FORWARD_TIMESTEPS = (0, 50, 100, 200, 300, 400, 500, 600, 800, 999)


def _tile(images: torch.Tensor, nrow: int) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (H', W', 3) grid for ``imshow``."""
    grid = torchvision.utils.make_grid(images.float().clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def _save(fig: plt.Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def _label_rows(ax: plt.Axes, names: Sequence[str], cell: int) -> None:
    """Class names on the y axis of a grid whose rows are ``cell`` + 1 pixels apart."""
    ax.set_yticks([1 + cell / 2 + i * (cell + 1) for i in range(len(names))], names)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def class_examples(dataset: str, count: int = 3) -> torch.Tensor:
    """The first test image of each of the first ``count`` classes of ``dataset``: (count, C, H, W) uint8."""
    from pipeline.data import load_image_data

    data = load_image_data(DataConfig(dataset=dataset, split="test", max_samples=200))
    return torch.stack([data.images[data.labels == c][0] for c in range(min(count, len(data.class_names)))])


def forward_noising(images: torch.Tensor, out: str | Path, timesteps: Sequence[int] = FORWARD_TIMESTEPS,
                    num_train_timesteps: int = 1000, seed: int = 0) -> Path:
    """Figures 6-7: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps of the same images and noise under the linear and
    the cosine schedule, one strip per image and schedule, and the curves of a_t = alpha_bar(t).

    Args:
        images: (K, C, H, W) uint8 data images (one strip each).
    """
    from pipeline.data import to_model_range

    clean = to_model_range(images)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    steps = torch.tensor(timesteps)
    fig = plt.figure(figsize=(1.0 * len(timesteps) + 4, 1.1 * 2 * len(images) + 0.6))
    grid = fig.add_gridspec(2, 2, width_ratios=[len(timesteps), 4], wspace=0.15)
    curves = fig.add_subplot(grid[:, 1])
    for row, schedule in enumerate(("linear", "cosine")):
        scheduler = make_train_scheduler(DiffusionConfig(schedule=schedule, num_train_timesteps=num_train_timesteps))
        strips = [scheduler.add_noise(x[None].expand(len(steps), -1, -1, -1), noise[i][None].expand(len(steps), -1, -1, -1), steps)
                  for i, x in enumerate(clean)]
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(_tile((torch.cat(strips) + 1) / 2, nrow=len(steps)), cmap="gray")
        cell = images.shape[-1] + 1
        ax.set_xticks([1 + cell / 2 + i * cell for i in range(len(steps))], [str(t) for t in timesteps])
        ax.set_yticks([])
        ax.set_title(f"{schedule} schedule: x_t at t =", fontsize=10)
        curves.plot(scheduler.alphas_cumprod.numpy(), label=schedule)
    curves.set_xlabel("t")
    curves.set_ylabel("alpha_bar(t)")
    curves.set_title("signal kept, alpha_bar(t)")
    curves.legend()
    curves.grid(alpha=0.3)
    return _save(fig, out)


def reverse_process(pipe: ConditionalDiffusionPipeline, out: str | Path, sample: SampleConfig | None = None, seed: int = 0,
                    columns: int = 8) -> Path:
    """Figures 8-9: for one sample of each class, the model's prediction of x_0 at ``columns`` evenly spaced
    steps of the reverse process (left: pure noise, right: the final image)."""
    sample = sample or SampleConfig()
    classes = list(range(pipe.unet.config.num_classes))
    steps = sample_images(pipe, sample, classes, seed, output_type="pt", return_intermediates=True).intermediates
    picks = np.linspace(0, len(steps) - 1, min(columns, len(steps))).round().astype(int)
    frames = torch.stack([steps[i] for i in picks], dim=1)  # (classes, columns, C, H, W)
    fig, ax = plt.subplots(figsize=(1.0 * len(picks) + 1, 1.0 * len(classes)))
    ax.imshow(_tile(frames.flatten(0, 1), nrow=len(picks)), cmap="gray")
    _label_rows(ax, pipe.class_names, pipe.unet.config.sample_size)
    ax.set_xlabel(f"predicted x_0 after step {', '.join(str(i + 1) for i in picks)} of {len(steps)} ({sample.sampler})")
    ax.set_title(f"reverse process, {sample.guidance_text()}")
    return _save(fig, out)


def _class_rows(pipe: ConditionalDiffusionPipeline, per_class: int, sample: SampleConfig, seed: int) -> torch.Tensor:
    """(classes * per_class, C, H, W) in [0, 1], ``per_class`` samples of every class in class order."""
    classes = list(range(pipe.unet.config.num_classes))
    return sample_images(pipe, sample, classes, seed, num_images_per_label=per_class, output_type="pt").images


def class_grid(pipe: ConditionalDiffusionPipeline, out: str | Path, per_class: int = 10, sample: SampleConfig | None = None,
               seed: int = 0, title: str | None = None) -> Path:
    """Figures 10-11: one row per class (named), ``per_class`` samples each."""
    sample = sample or SampleConfig()
    images = _class_rows(pipe, per_class, sample, seed)
    fig, ax = plt.subplots(figsize=(0.6 * per_class + 1, 0.6 * pipe.unet.config.num_classes + 0.5))
    ax.imshow(_tile(images, nrow=per_class), cmap="gray")
    _label_rows(ax, pipe.class_names, pipe.unet.config.sample_size)
    settings = f"{sample.sampler}, {sample.num_inference_steps} steps, {sample.guidance_text()}"
    ax.set_title(f"{title}\n{settings}" if title else settings, fontsize=9)
    return _save(fig, out)


def guidance_sweep(pipe: ConditionalDiffusionPipeline, out: str | Path, scales: Sequence[float] = (1.0, 2.0, 3.0, 5.0),
                   per_class: int = 4, sample: SampleConfig | None = None, seed: int = 0) -> Path:
    """The same noise sampled at each classifier-free guidance scale: one panel per scale, one row per class."""
    sample = sample or SampleConfig()
    fig, axes = plt.subplots(1, len(scales), figsize=(0.6 * per_class * len(scales) + 1, 0.6 * pipe.unet.config.num_classes + 0.6))
    for i, (ax, scale) in enumerate(zip(np.atleast_1d(axes), scales, strict=True)):
        ax.imshow(_tile(_class_rows(pipe, per_class, dataclasses.replace(sample, guidance_scale=scale), seed), nrow=per_class),
                  cmap="gray")
        _label_rows(ax, pipe.class_names if i == 0 else [], pipe.unet.config.sample_size)
        ax.set_title(f"s = {scale}")
    fig.suptitle(f"classifier-free guidance sweep ({sample.sampler}, {sample.num_inference_steps} steps)")
    return _save(fig, out)


def guidance_tradeoff(series: Mapping[str, Sequence[tuple[float, float, float]]], out: str | Path, distance: str = "cfid") -> Path:
    """The guidance trade-off: conditional accuracy against a distance to the data (lower is better), one small point
    per (scale, seed) and, per series, a line through the mean over seeds at each scale, labelled with the scale.

    ``series``: name -> ``(guidance_scale, distance, accuracy)`` per evaluated seed."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for index, (name, points) in enumerate(series.items()):
        color = f"C{index}"
        scales = sorted({scale for scale, _, _ in points})
        means = [np.mean([(d, a) for s, d, a in points if s == scale], axis=0) for scale in scales]
        ax.scatter([d for _, d, _ in points], [a for _, _, a in points], s=10, alpha=0.35, color=color)
        ax.plot([m[0] for m in means], [m[1] for m in means], marker="o", color=color, label=name)
        for scale, (x, y) in zip(scales, means, strict=True):
            ax.annotate(f"{scale:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlabel(f"{distance} (lower is better)")
    ax.set_ylabel("conditional accuracy")
    ax.set_title("classifier-free guidance: accuracy against distance to the data\n(labels: guidance scale; faint: each seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def quality_curve(run_dir: str | Path, out: str | Path, batch_size: int, tags: Sequence[str] = ("eval/fid", "eval/accuracy")) -> Path:
    """Each in-training metric (``train.eval_every``) against wall-clock minutes of training and against images
    seen (step x ``batch_size``): one row of two panels per tag."""
    minutes = training_minutes(run_dir)
    fig, axes = plt.subplots(len(tags), 2, figsize=(9, 3 * len(tags)), squeeze=False)
    for row, tag in zip(axes, tags, strict=True):
        steps, values = read_scalars(run_dir, tag)
        if not steps:
            raise ValueError(f"no {tag!r} scalars under {run_dir}; train with --train.eval_every and --train.eval_metrics")
        timed = [(minutes[s], v) for s, v in zip(steps, values, strict=True) if s in minutes]  # eval steps are log steps
        row[0].plot(*zip(*timed, strict=True), marker="o")
        row[1].plot([s * batch_size for s in steps], values, marker="o")
        row[0].set_xlabel("training wall-clock minutes")
        row[1].set_xlabel("training images seen")
        for ax in row:
            ax.set_ylabel(tag)
            ax.grid(alpha=0.3)
    return _save(fig, out)


TIME_TO_FID_COLUMNS = ("run", "minutes", "images", "fid")


def time_to_fid(points_csv: str | Path, out: str | Path) -> Path:
    """FID against training wall-clock minutes and against images seen, one line per run through its measured
    points (log-scaled FID). ``points_csv`` has a header with at least ``run``, ``minutes``, ``images`` and ``fid``
    (any further columns, e.g. the command and the hardware, are for the reader)."""
    with open(points_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or (missing := [c for c in TIME_TO_FID_COLUMNS if c not in rows[0]]):
        raise ValueError(f"{points_csv}: needs a header with the columns {', '.join(TIME_TO_FID_COLUMNS)} and a row per point"
                         + (f" (missing: {', '.join(missing)})" if rows else ""))
    runs: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        runs.setdefault(row["run"], []).append((float(row["minutes"]), float(row["images"]), float(row["fid"])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, points) in enumerate(runs.items()):
        points.sort()
        for ax, axis in zip(axes, (0, 1), strict=True):
            ax.plot([p[axis] for p in points], [p[2] for p in points], marker="o", color=f"C{index}", label=name)
            for point in points:
                ax.annotate(f"{point[2]:.1f}", (point[axis], point[2]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    fids = [fid for points in runs.values() for *_, fid in points]
    ticks = [tick for tick in (5, 10, 15, 20, 25, 30, 40, 50, 70, 100, 150, 200, 300) if min(fids) / 1.3 <= tick <= max(fids) * 1.3]
    for axis, (ax, label) in enumerate(zip(axes, ("training wall-clock minutes", "training images seen"), strict=True)):
        ax.set_xlabel(label)
        ax.set_ylabel("FID (lower is better)")
        ax.set_yscale("log")
        ax.set_yticks(ticks, [f"{tick:g}" for tick in ticks])
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(0, max(point[axis] for points in runs.values() for point in points) * 1.12)
        ax.grid(alpha=0.3, which="both")
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value / 1e6:g} M"))
    # below the panels: the runs' points fill both
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
    return _save(fig, out)


def loss_curves(runs: Mapping[str, str | Path], out: str | Path, tag: str = "train/loss") -> Path:
    """Figure 12: the training loss of each run (name -> run directory with ``tensorboard/``), log scale.
    Runs without the scalar yet (fewer steps than ``train.log_every``) are drawn empty."""
    curves = {name: read_scalars(run_dir, tag) for name, run_dir in runs.items()}
    if not any(steps for steps, _ in curves.values()):
        raise ValueError(f"no {tag!r} scalars under {', '.join(map(str, runs.values()))}; are they training output directories?")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(tag)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", **choice_flag(["forward", "reverse", "grid", "loss", "curve", "guidance",
                                                              "time-to-fid", "all"]))
    parser.add_argument("--pipeline", help="exported pipeline directory")
    parser.add_argument("--run", action="append", default=[], help="training output directory (loss; repeat to overlay)")
    parser.add_argument("--dataset", help="data for the forward figure (default: the run's, else data/mnist)")
    parser.add_argument("--points", help="time-to-fid: a CSV of measured points (run, minutes, images, fid)")
    parser.add_argument("--out", help="PNG path (single figures)")
    parser.add_argument("--out-dir", help="directory for 'all'")
    add_sample_flags(parser)
    parser.add_argument("--scales", default="1,2,3,5", help="guidance scales of the sweep")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.figure == "all") != bool(args.out_dir) or (args.figure != "all" and not args.out):
        parser.error("'all' takes --out-dir; every other figure takes --out")
    needs_pipeline = args.figure in ("reverse", "grid", "guidance", "all")
    if needs_pipeline and not args.pipeline:
        parser.error(f"{args.figure} needs --pipeline")
    cfg = saved_run_config(args.pipeline)
    try:
        sample = flagged_settings(cfg.sample, args)
    except ConfigError as error:  # a bad sampling flag fails before the pipeline loads
        parser.error(str(error))
    try:
        if args.pipeline:
            args.pipeline = pipeline_location(args.pipeline)
    except ConfigError as error:  # no such folder, or no export in it: one line, not the hub client's id check
        print(f"error: {error}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else None
    path = (lambda name: out_dir / f"{name}.png") if out_dir else (lambda name: Path(args.out))
    wanted = ["forward", "reverse", "grid", "guidance", "loss"] if args.figure == "all" else [args.figure]
    pipe = ConditionalDiffusionPipeline.from_pretrained(args.pipeline) if needs_pipeline else None
    runs = args.run or ([str(Path(args.pipeline).parent)] if args.pipeline and args.figure == "all" else [])
    try:
        for name in wanted:
            if name == "forward":
                written = forward_noising(class_examples(args.dataset or cfg.data.dataset), path(name), seed=args.seed)
            elif name == "reverse":
                written = reverse_process(pipe, path(name), sample, args.seed)
            elif name == "grid":
                written = class_grid(pipe, path(name), args.per_class, sample, args.seed)
            elif name == "time-to-fid":
                if not args.points:
                    parser.error("time-to-fid needs --points (a CSV with the columns run, minutes, images, fid)")
                written = time_to_fid(args.points, path(name))
            elif name == "guidance":
                scales = [float(s) for s in args.scales.split(",")]
                written = guidance_sweep(pipe, path(name), scales, min(args.per_class, 6), sample, args.seed)
            else:
                if not runs:
                    parser.error(f"{name} needs --run (a training output directory)")
                if name == "curve":
                    batch = load_config(Path(runs[0]) / "config.yaml").train.batch_size
                    written = quality_curve(runs[0], path(name), batch)
                else:
                    written = loss_curves({Path(r).name: r for r in runs}, path(name))
            print(f"wrote {written}")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
