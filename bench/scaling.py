"""Data-parallel scaling on this machine's CPU: the real training command with 1 and 2 processes (gloo).

    python bench/scaling.py                                 # quickstart config, 120 steps per run
    python bench/scaling.py --steps 200 --override=--train.batch_size=128

Each run is ``pipeline/train.py`` as users start it, same config and global batch, with nothing else running:

- 1 process, ``OMP_NUM_THREADS`` unset (torch uses every core)
- 1 process, ``OMP_NUM_THREADS=1`` (the single-core baseline of the per-core efficiency)
- 2 processes x 1 thread: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``
  (``accelerate launch --cpu --num_processes 2`` silently starts one process)

Throughput is the median of the ``train/images_per_s`` windows TensorBoard logged after the first (which pays
for start-up), so imports, data decoding and the final checkpoint are not counted; wall time is printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.names import PROJECT_ROOT
from pipeline.tensorboard_logs import read_scalars

TRAIN = str(PROJECT_ROOT / "pipeline" / "train.py")
RUNS = {
    "1 process, all cores": ({}, [sys.executable, TRAIN]),
    "1 process, OMP_NUM_THREADS=1": ({"OMP_NUM_THREADS": "1"}, [sys.executable, TRAIN]),
    "2 processes x 1 thread (gloo)": (
        {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517", TRAIN],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "quickstart-cpu.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--override", action="append", default=[], help="config override, e.g. --override=--train.batch_size=128")
    args = parser.parse_args()
    overrides = [part for o in args.override for part in o.split("=", 1)]

    print(f"{os.cpu_count()} cores; {args.config} {' '.join(overrides)}; {args.steps} steps, throughput windows of {args.log_every}")
    print("| run | images/s (median window) | vs 1 process, all cores | wall s |\n|---|---|---|---|")
    reference = None
    with tempfile.TemporaryDirectory() as scratch:
        for name, (env, launcher) in RUNS.items():
            out = Path(scratch) / "run"
            command = [*launcher, "--config", args.config, *overrides, "--train.output_dir", str(out), "--train.max_steps",
                       str(args.steps), "--train.log_every", str(args.log_every), "--train.sample_every", "none",
                       "--train.checkpoint_every", "none"]
            started = time.perf_counter()
            subprocess.run(command, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=PROJECT_ROOT)
            wall = time.perf_counter() - started
            rate = statistics.median(read_scalars(out / "tensorboard", "train/images_per_s")[1][1:])
            reference = reference or rate
            print(f"| {name} | {rate:.1f} | {rate / reference:.2f}x | {wall:.0f} |", flush=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
