"""Benchmark the README's main job: wall time of the quickstart training and the conditional quality it reaches.

    python bench/quickstart.py                       # configs/quickstart-cpu.yaml as shipped
    python bench/quickstart.py --train.max_steps 500 # any override of the training config
    python bench/quickstart.py --no-peer             # ours alone

Trains exactly as the README does (a subprocess of ``pipeline/train.py``), then samples ``--per-class`` digits
of every class from the exported EMA pipeline and reports the share the committed MNIST classifier
(test accuracy 99.35 %) assigns to the requested class, for a few guidance scales. Then, in the same run, the
plain diffusers recipe (``bench/diffusers_recipe.py``: diffusers' ``UNet2DModel`` matched to our parameter count,
trained as diffusers' ``train_unconditional.py`` trains) gets the same wall time on the same data and is scored
the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.diffusers_recipe import peer_pipeline, train_peer
from pipeline import ConditionalDiffusionPipeline, load_config
from pipeline.evaluation import Evaluator
from pipeline.names import PROJECT_ROOT
from pipeline.sampling import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "quickstart-cpu.yaml"))
    parser.add_argument("--output-dir", default=str(PROJECT_ROOT / "runs" / "bench-quickstart"))
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--guidance", default="1,2,3", help="guidance scales to report (the config's is always included)")
    parser.add_argument("--skip-training", action="store_true", help="evaluate an existing run in --output-dir")
    parser.add_argument("--no-peer", action="store_true", help="skip the diffusers recipe")
    args, overrides = parser.parse_known_args()
    cfg = load_config(args.config, [*overrides, "--train.output_dir", args.output_dir])

    train_s = None
    if not args.skip_training:
        command = [sys.executable, str(PROJECT_ROOT / "pipeline" / "train.py"), "--config", args.config, *overrides,
                   "--train.output_dir", args.output_dir]
        started = time.perf_counter()
        code = subprocess.call(command, cwd=PROJECT_ROOT)
        train_s = time.perf_counter() - started
        if code not in (0, 75):
            raise SystemExit(f"training failed with exit status {code}")

    pipes = {"ours": ConditionalDiffusionPipeline.from_pretrained(str(Path(args.output_dir) / "pipeline"))}
    peer_dir = Path(args.output_dir + "-diffusers")
    peer = None
    if not args.no_peer:
        if not args.skip_training:
            peer = train_peer(cfg, peer_dir, minutes=train_s / 60)  # the same wall time as ours, start-up included
        pipes["diffusers recipe"] = peer_pipeline(peer_dir)
    evaluator = Evaluator(cfg.data.dataset, metrics=("accuracy",), classifier="mnist")
    scales = sorted({float(g) for g in args.guidance.split(",")} | {cfg.sample.guidance_scale})
    rows = []
    for name, pipe in pipes.items():
        for scale in scales:
            started = time.perf_counter()
            samples = generate(pipe, args.per_class, dataclasses.replace(cfg.sample, guidance_scale=scale), seed=0)
            accuracy = evaluator.score(samples)["accuracy"]
            rows.append({"model": name, "guidance_scale": scale, "accuracy": accuracy, "sample_s": time.perf_counter() - started})

    result = {
        "config": args.config, "overrides": overrides, "train_wall_s": train_s, "torch_threads": torch.get_num_threads(),
        "sampler": cfg.sample.sampler, "steps": cfg.sample.num_inference_steps, "per_class": args.per_class, "rows": rows,
        "peer": peer,
    }
    print(json.dumps(result, indent=1))
    print(f"\nquickstart: training wall time {train_s / 60:.1f} min" if train_s else "\nquickstart (existing run)")
    print("| model | guidance | conditional accuracy | sampling s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['guidance_scale']:g} | {row['accuracy']:.4f} | {row['sample_s']:.1f} |")


if __name__ == "__main__":
    main()
