"""Sampling speed against quality: time per image, conditional accuracy and classifier-FID per sampler and steps.

    python bench/quickstart.py --per-class 20                   # trains runs/bench-quickstart, used below
    python bench/sampling.py --pipeline runs/bench-quickstart/pipeline --per-class 50

Every row samples the same class-balanced set (``--per-class`` of each class, same seeds) from one exported
pipeline and scores it with the committed classifier of its data set (``pipeline.evaluation.Evaluator``:
conditional accuracy with its binomial standard error, and classifier-feature FID against 10,000 training
images). Guidance runs the conditional and unconditional halves in one batched forward, so it doubles the
batch, not the number of model evaluations (NFE). The first row is the peer every other row is measured
against: DDPM's ancestral sampler at its 1,000 training steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import ConditionalDiffusionPipeline  # noqa: E402
from pipeline.config import SampleConfig  # noqa: E402
from pipeline.evaluation import Evaluator  # noqa: E402
from pipeline.evaluation.metrics import hardware  # noqa: E402
from pipeline.evaluation.sampling import generate, saved_run_config  # noqa: E402

# (sampler, steps): the peer first, then the fast samplers the issue compares
SCHEDULES = [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpmsolver++", 20), ("dpmsolver++", 10), ("unipc", 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="an exported pipeline directory (<run>/pipeline)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--guidance", default="1,3", help="guidance scales (1 = conditional model only)")
    parser.add_argument("--schedules", default=",".join(f"{s}:{n}" for s, n in SCHEDULES), help="sampler:steps,...")
    parser.add_argument("--precisions", default="bf16", help="no (fp32) and/or bf16 (autocast)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    pipe = ConditionalDiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    dataset = saved_run_config(args.pipeline).data.dataset
    evaluator = Evaluator(dataset, metrics=("accuracy", "cfid"))
    schedules = [(s.split(":")[0], int(s.split(":")[1])) for s in args.schedules.split(",")]
    print(f"{hardware()}, threads={torch.get_num_threads()}; {args.pipeline} ({dataset}), "
          f"{args.per_class} per class, batch {args.batch_size}")
    print("| sampler | steps (NFE) | guidance | precision | s / image | speed-up vs first row | conditional accuracy | classifier-FID |")
    print("|---|---|---|---|---|---|---|---|")
    rows, reference = [], None
    for guidance in (float(g) for g in args.guidance.split(",")):
        for precision in args.precisions.split(","):
            for sampler, steps in schedules:
                sample = SampleConfig(sampler=sampler, num_inference_steps=steps, guidance_scale=guidance)
                started = time.perf_counter()
                samples = generate(pipe, args.per_class, sample, seed=0, batch_size=args.batch_size, mixed_precision=precision)
                per_image = (time.perf_counter() - started) / len(samples)
                score = evaluator.score(samples)
                reference = reference or per_image
                stderr = math.sqrt(score["accuracy"] * (1 - score["accuracy"]) / score["n"])
                rows.append({"sampler": sampler, "steps": steps, "guidance": guidance, "precision": precision,
                             "s_per_image": per_image, "accuracy": score["accuracy"], "accuracy_stderr": stderr,
                             "cfid": score["cfid"], "n": score["n"]})
                print(f"| {sampler} | {steps} | {guidance:g} | {precision} | {per_image:.4f} | {reference / per_image:.1f}x | "
                      f"{100 * score['accuracy']:.1f} % ± {100 * stderr:.1f} | {score['cfid']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
