"""Sampling speed against quality: time per image, conditional accuracy and classifier-FID per sampler and steps.

    python bench/quickstart.py --per-class 20                   # trains runs/bench-quickstart, used below
    python bench/sampling.py --pipeline runs/bench-quickstart/pipeline --per-class 50

Every row samples the same class-balanced set (``--per-class`` of each class, same seeds) from one exported
pipeline and scores it with the committed classifier of its data set (``pipeline.evaluation.Evaluator``:
conditional accuracy with its binomial standard error, and a column per further ``--metrics``, by default
classifier-feature FID, against ``--ref-split`` / ``--ref-samples``, by default 10,000 training images; ``--metrics
accuracy,cfid,fid --ref-split test --ref-samples all`` gives Inception FID against the test split, as ``evaluate``
scores a model). Guidance runs the conditional and unconditional halves in one batched forward, so it doubles the
batch, not the number of model evaluations (NFE). The first row is the peer every other row is measured
against: DDPM's ancestral sampler at its 1,000 training steps.

The ``vs floor`` column compares each row's time per image with the model-forward floor: its number of model
evaluations times the time of one batched forward of the U-Net (both guidance halves, the same precision and
chunk), so it shows what the sampler, scheduler and pipeline add on top of the network itself.
``--chunks 10,25,50,100`` instead times one sampler at several chunk sizes and precisions against that floor
(how ``pipeline.sampling.sampling_batch`` and the pipeline's ``mixed_precision="auto"`` were chosen).
``--student DIR`` adds rows for a distilled student of the pipeline (``python -m pipeline.distill``) at
``--student-steps`` with its own sampler, on the same classes, seeds and scorer; its column of U-Net evaluations per
image counts one per step where the guided pipeline counts two.
``--readme-call`` times the README's sampling call, ``pipe(class_labels=[two names], num_images_per_label=k,
guidance_scale=3.0, num_inference_steps=20).images`` on the pipeline as loaded, against ``generate`` with the same
scheduler, steps and guidance: as written (k = 4) and at ``generate``'s own chunk, interleaved ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import ConditionalDiffusionPipeline
from pipeline.config import SampleConfig
from pipeline.diffusion import SAMPLERS
from pipeline.errors import ConfigError
from pipeline.evaluation import Evaluator
from pipeline.evaluation.metrics import hardware, parse_metrics
from pipeline.pipeline_conditional import sampling_autocast
from pipeline.sample_flags import add_score_flags, pipeline_location, score_reference
from pipeline.sampling import generate, sampling_batch, saved_run_config
from pipeline.student_card import sampling_evaluations

# (sampler, steps): the peer first, then the fast samplers the issue compares
SCHEDULES = [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpmsolver++", 20), ("dpmsolver++", 10), ("unipc", 10)]


def forward_floor(pipe: ConditionalDiffusionPipeline, chunk: int, guidance: float, precision: str, repeats: int = 5) -> float:
    """Seconds per image of one model evaluation: the median time of the pipeline's guided prediction for ``chunk``
    images (one forward of twice that batch with guidance, as the pipeline runs both halves together; one of ``chunk``
    for a distilled student, which takes the scale as an input), divided by ``chunk``."""
    config = pipe.unet.config
    x = torch.randn(chunk, config.in_channels, config.sample_size, config.sample_size, device=pipe.device)
    t = torch.full((), 500, device=pipe.device)
    labels = torch.zeros(chunk, dtype=torch.long, device=pipe.device)
    times = []
    with torch.no_grad(), sampling_autocast(precision, pipe.device, pipe.unet.dtype):
        for _ in range(repeats + 1):  # the first call warms up
            started = time.perf_counter()
            pipe.predict_noise(x, t, labels, guidance)
            times.append(time.perf_counter() - started)
    return sorted(times[1:])[repeats // 2] / chunk


def chunk_sweep(pipe: ConditionalDiffusionPipeline, args: argparse.Namespace) -> None:
    """Time per image of one sampler against the forward floor, per chunk size and precision."""
    sampler, steps = args.schedules.split(",")[0].split(":")
    guidance = float(args.guidance.split(",")[-1])
    per_class = args.per_class
    print("| sampler | steps | guidance | precision | chunk | s / image | floor s / image | vs floor |\n|---|---|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        for chunk in (int(c) for c in args.chunks.split(",")):
            sample = SampleConfig(sampler=sampler, num_inference_steps=int(steps), guidance_scale=guidance)
            started = time.perf_counter()
            samples = generate(pipe, per_class, sample, batch_size=chunk, mixed_precision=precision)
            per_image = (time.perf_counter() - started) / len(samples)
            floor = forward_floor(pipe, chunk, guidance, precision) * int(steps)  # one model evaluation per step
            print(f"| {sampler} | {steps} | {guidance:g} | {precision} | {chunk} | {per_image:.4f} | {floor:.4f} | "
                  f"{per_image / floor:.2f}x |", flush=True)


def sampler_name(pipe: ConditionalDiffusionPipeline) -> str:
    """The name (``SAMPLERS``' key) of the scheduler ``pipe`` ships with."""
    return next(name for name, scheduler in SAMPLERS.items() if type(pipe.scheduler) is scheduler)


def readme_call(pipe: ConditionalDiffusionPipeline, args: argparse.Namespace) -> None:
    """Seconds per image of the README's call against ``generate``'s on the same model (median of ``--repeats``)."""
    chunk = args.batch_size or sampling_batch(pipe.device)
    names = pipe.class_names[:2]
    sampler = sampler_name(pipe)
    settings = SampleConfig(sampler=sampler, num_inference_steps=20, guidance_scale=3.0)
    per_class = max(1, chunk // len(pipe.class_names))
    pipe.set_progress_bar_config(disable=True)
    timings: dict[str, list[float]] = {}

    def timed(name: str, images: int, call: Callable[[], object]) -> None:
        started = time.perf_counter()
        call()
        timings.setdefault(name, []).append((time.perf_counter() - started) / images)

    for _ in range(args.repeats):
        for per_label in (4, chunk // 2):
            timed(f"README call, {2 * per_label} images", 2 * per_label, lambda k=per_label: pipe(
                class_labels=names, num_images_per_label=k, guidance_scale=3.0, num_inference_steps=20).images)
        timed(f"README call, {chunk // 2 * 2} images, mixed_precision='no' (the call before issue 22)", chunk // 2 * 2,
              lambda: pipe(class_labels=names, num_images_per_label=chunk // 2, guidance_scale=3.0, num_inference_steps=20,
                           mixed_precision="no").images)
        timed(f"generate(), {per_class * len(pipe.class_names)} images", per_class * len(pipe.class_names),
              lambda: generate(pipe, per_class, settings, batch_size=chunk))
    medians = {name: statistics.median(times) for name, times in timings.items()}
    reference = medians[next(name for name in medians if name.startswith("generate"))]
    print(f"{sampler}, 20 steps, guidance 3, chunk {chunk}, median of {args.repeats}")
    print("| call | s / image | vs generate() |\n|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.4f} | {seconds / reference:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="an exported pipeline directory (<run>/pipeline)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--guidance", default="1,3", help="guidance scales (1 = conditional model only)")
    parser.add_argument("--schedules", default=",".join(f"{s}:{n}" for s, n in SCHEDULES), help="sampler:steps,...")
    parser.add_argument("--precisions", default="auto", help="auto, no (fp32) and/or bf16 (autocast)")
    parser.add_argument("--batch-size", type=int, help="images per chunk (default: the device's, sampling_batch)")
    parser.add_argument("--chunks", help="time the first schedule at these chunk sizes against the forward floor, e.g. 10,25,50,100")
    parser.add_argument("--readme-call", action="store_true", help="time the README's pipe(...) call against generate()")
    parser.add_argument("--repeats", type=int, default=3, help="with --readme-call: interleaved repeats (the median is shown)")
    parser.add_argument("--student", help="a distilled student of --pipeline (python -m pipeline.distill): rows for it too, "
                                          "with its own sampler at --student-steps")
    parser.add_argument("--student-steps", default="1,2,4,8", help="the student's step counts")
    add_score_flags(parser)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    try:
        pipeline_location(args.pipeline)
        dataset = saved_run_config(args.pipeline).data.dataset
        metrics = ("accuracy", *(metric for metric in parse_metrics(args.metrics) if metric != "accuracy"))
        reference = score_reference(args, dataset)
    except ConfigError as error:  # no such folder, an unknown metric: one line, not the hub client's id check
        parser.exit(2, f"error: {error}\n")

    pipe = ConditionalDiffusionPipeline.from_pretrained(args.pipeline)
    print(f"{hardware()}, threads={torch.get_num_threads()}; {args.pipeline}, {args.per_class} per class")
    if args.chunks:
        return chunk_sweep(pipe, args)
    if args.readme_call:
        return readme_call(pipe, args)
    chunk = args.batch_size or sampling_batch(pipe.device)
    evaluator = Evaluator(dataset, metrics, reference=reference)
    models = [("pipeline", pipe, [(s.split(":")[0], int(s.split(":")[1])) for s in args.schedules.split(",")])]
    if args.student:
        student = ConditionalDiffusionPipeline.from_pretrained(pipeline_location(args.student))
        models.append(("student", student, [(sampler_name(student), int(n)) for n in args.student_steps.split(",")]))
    print(f"data set {dataset}, chunk {chunk}")
    distances = metrics[1:]
    print("| model | sampler | steps | U-Net evaluations / image | guidance | precision | s / image | vs floor | speed-up vs first row | "
          + " | ".join(["conditional accuracy", *distances]) + " |")
    print("|---" * (10 + len(distances)) + "|")
    rows, first_row = [], None
    for guidance in (float(g) for g in args.guidance.split(",")):
        for precision in args.precisions.split(","):
            for model, model_pipe, schedules in models:
                for sampler, steps in schedules:
                    sample = SampleConfig(sampler=sampler, num_inference_steps=steps, guidance_scale=guidance)
                    started = time.perf_counter()
                    samples = generate(model_pipe, args.per_class, sample, seed=0, batch_size=chunk, mixed_precision=precision)
                    per_image = (time.perf_counter() - started) / len(samples)
                    floor = forward_floor(model_pipe, chunk, guidance, precision) * steps
                    evaluations = sampling_evaluations(sample, student=model_pipe.is_student)
                    score = evaluator.score(samples)
                    first_row = first_row or per_image
                    stderr = math.sqrt(score["accuracy"] * (1 - score["accuracy"]) / score["n"])
                    rows.append({"model": model, "sampler": sampler, "steps": steps, "unet_evaluations": evaluations,
                                 "guidance": guidance, "precision": precision, "s_per_image": per_image, "floor_s_per_image": floor,
                                 "accuracy": score["accuracy"], "accuracy_stderr": stderr, "n": score["n"]}
                                | {metric: score[metric] for metric in distances})
                    cells = [model, sampler, steps, evaluations, f"{guidance:g}", precision, f"{per_image:.4f}",
                             f"{per_image / floor:.2f}x", f"{first_row / per_image:.1f}x",
                             f"{100 * score['accuracy']:.1f} % ± {100 * stderr:.1f}",
                             *(f"{score[metric]:.2f}" for metric in distances)]
                    print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
