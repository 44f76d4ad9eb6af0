"""Each speed lever of the training step, measured alone against our defaults, on our U-Net.

    python bench/levers.py                        # MNIST quickstart shape, batch 64
    python bench/levers.py --shape cifar10 --batch 32 --seconds 20
    python bench/levers.py --shape cifar10 --config configs/cifar10-cpu.yaml   # at a recipe's own U-Net

The default step is what ``pipeline/train.py`` runs: bf16 autocast, PyTorch's fused scaled-dot-product
attention, foreach AdamW (fused on CUDA), diffusers ``EMAModel`` with foreach, no host synchronisation
per step. Every other row changes one thing. Each row runs in its own process, ``--repeats`` times
interleaved, and the median is printed with the ratio to the default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from bench.train_throughput import Levers, config_flags, interleaved, measure, ours
from pipeline.config_decoding import choice_flag

# name: (what the row changes, its options)
LEVERS = {
    "default": ("default: bf16 autocast, SDPA, foreach AdamW and EMA", {}),
    "fp32": ("fp32 (no autocast)", {"bf16": False}),
    "explicit-attention": ("explicit softmax(QK^T)V attention instead of SDPA", {"attention": "explicit"}),
    "channels-last": ("channels_last memory format", {"channels_last": True}),
    "compile": ("torch.compile", {"compile": True}),
    "fused-adamw": ("fused AdamW", {"fused_adamw": True}),
    "ema-loop": ("EMA update one tensor at a time (no foreach)", {"ema_foreach": False}),
    "sync-every-step": ("loss.item() after every step", {"sync_every_step": True}),
}


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What attention costs without the fused kernel: (B, n, L, d) -> (B, n, L, d)."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def one(name: str, args: argparse.Namespace) -> dict:
    options = dict(LEVERS[name][1])
    bf16 = options.pop("bf16", True)
    if options.pop("attention", "sdpa") == "explicit":
        torch.nn.functional.scaled_dot_product_attention = explicit_attention  # the U-Net calls it through F
    levers = Levers(**options)
    model = ours(args.shape, args.override, args.config)
    result = measure(model, args.shape, args.batch, args.seconds, bf16, torch.device(args.device), levers)
    return {"lever": name, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mnist", **choice_flag(["mnist", "cifar10"]))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, from {', '.join(LEVERS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", help="the config whose U-Net is measured (default: the shape's, e.g. configs/cifar10.yaml)")
    parser.add_argument("--override", action="append", default=[], help="override of that config, e.g. --override=--train.lr=1e-3")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return print(json.dumps(one(args.one, args)))

    names = args.levers.split(",")
    if unknown := [name for name in names if name not in LEVERS]:
        parser.error(f"unknown lever(s) {', '.join(unknown)}; choose from {', '.join(LEVERS)}")
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} shape={args.shape} batch={args.batch} "
          f"seconds={args.seconds} repeats={args.repeats} config={args.config or 'of the shape'} overrides={args.override}")
    runs = interleaved({name: [sys.executable, __file__, "--one", name, "--shape", args.shape, "--batch", str(args.batch), "--seconds",
                               str(args.seconds), "--device", args.device, *config_flags(args)] for name in names}, args.repeats)
    default = statistics.median(r["images_per_s"] for r in runs.get("default", runs[names[0]]))
    print("| lever | images/s (median) | vs default | warm-up s (2 steps, incl. compilation) |\n|---|---|---|---|")
    for name, results in runs.items():
        rate = statistics.median(r["images_per_s"] for r in results)
        warmup = statistics.median(r["warmup_s"] for r in results)
        print(f"| {LEVERS[name][0]} | {rate:.1f} | {rate / default:.2f}x | {warmup:.1f} |")


if __name__ == "__main__":
    main()
