"""Training-step throughput of our U-Net against its peers at matched parameter count and resolution.

    python bench/train_throughput.py                          # MNIST and CIFAR-10 shapes, fp32 and bf16
    python bench/train_throughput.py --shapes mnist --batch 64 --steps 10

Peers: diffusers' ``UNet2DModel`` (``num_class_embeds``) and lucidrains' ``denoising-diffusion-pytorch``
classifier-free-guidance ``Unet`` (``pip install denoising-diffusion-pytorch``), each widened until its
parameter count is the closest to ours. A step is what training does: forward (under bf16 autocast where
asked), epsilon-MSE, backward, AdamW, EMA update (diffusers ``EMAModel``, foreach) — the same for all.
Each (model, shape, precision) runs in its own process, so peak memory (max RSS, or CUDA max allocated)
is its own. Prints a table with images/s and the ratio to diffusers measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import load_config  # noqa: E402
from pipeline.data import ImageData  # noqa: E402
from pipeline.training import build_unet  # noqa: E402

# (channels, size, the config whose U-Net is ours at this shape)
SHAPES = {"mnist": (1, 28, "configs/quickstart-cpu.yaml"), "cifar10": (3, 32, "configs/cifar10.yaml")}
NUM_CLASSES = 10


def ours(shape: str, cfg_overrides: list[str]) -> torch.nn.Module:
    channels, size, config = SHAPES[shape]
    cfg = load_config(REPO / config, cfg_overrides)
    fake = ImageData(torch.zeros(1, channels, size, size, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                     [str(i) for i in range(NUM_CLASSES)])
    return build_unet(cfg, fake)


def diffusers_unet(shape: str, width: int, levels: int, layers: int) -> torch.nn.Module:
    from diffusers import UNet2DModel

    channels, size, _ = SHAPES[shape]
    mults = [1] + [2] * (levels - 1)
    down = ["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D"]  # attention at the lowest resolution, as ours
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=[width * m for m in mults],
                       down_block_types=down, up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * (levels - 1),
                       layers_per_block=layers, num_class_embeds=NUM_CLASSES + 1, norm_num_groups=8)


def lucidrains_unet(shape: str, width: int, levels: int, layers: int) -> torch.nn.Module:
    from denoising_diffusion_pytorch.classifier_free_guidance import Unet

    channels, _, _ = SHAPES[shape]
    return Unet(dim=width, num_classes=NUM_CLASSES, dim_mults=tuple([1] + [2] * (levels - 1)), channels=channels, cond_drop_prob=0.0)


PEERS = {"diffusers UNet2DModel": diffusers_unet, "lucidrains Unet": lucidrains_unet}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched(build, shape: str, target: int, levels: int, layers: int) -> tuple[int, int]:
    """The width (multiple of 8) whose parameter count is closest to ``target``: (width, params)."""
    best = min((abs(count(build(shape, w, levels, layers)) - target), w) for w in range(8, 257, 8))
    return best[1], count(build(shape, best[1], levels, layers))


def forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x, t, y)  # ours and lucidrains take (x, t, classes); diffusers' third positional is class_labels
    return out.sample if hasattr(out, "sample") else out


def measure(model: torch.nn.Module, shape: str, batch: int, steps: int, bf16: bool, device: torch.device) -> float:
    """Images per second of full training steps (after two warm-up steps)."""
    from diffusers.training_utils import EMAModel

    channels, size, _ = SHAPES[shape]
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ema = EMAModel(model.parameters(), decay=0.999, foreach=True)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g, device=device)
    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g, device=device)
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = (forward(model, x, t, y).float() - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def one(args: argparse.Namespace) -> None:
    """Child process: build one model, measure it, print one JSON line."""
    device = torch.device(args.device)
    mine = ours(args.shape, args.override)
    levels, layers = len(mine.config.channel_mult), mine.config.layers_per_block
    if args.model == "ours":
        model = mine
    else:
        width, _ = matched(PEERS[args.model], args.shape, count(mine), levels, layers)
        model = PEERS[args.model](args.shape, width, levels, layers)
    images_per_s = measure(model, args.shape, args.batch, args.steps, args.precision == "bf16", device)
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"model": args.model, "params": count(model), "images_per_s": images_per_s, "peak_mib": memory / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mnist,cifar10")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--models", default="ours," + ",".join(PEERS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--override", action="append", default=[], help="override of our config, e.g. --override=--model.upsample=nearest")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "SHAPE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.model, args.shape, args.precision = args.one
        return one(args)

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} steps={args.steps}")
    print("| shape | precision | model | params | images/s | vs diffusers | peak MiB |\n|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for precision in args.precisions.split(","):
            rows = []
            for model in args.models.split(","):
                command = [sys.executable, __file__, "--one", model, shape, precision, "--batch", str(args.batch), "--steps",
                           str(args.steps), "--device", args.device, *[f"--override={o}" for o in args.override]]
                rows.append(json.loads(subprocess.check_output(command, text=True).strip().splitlines()[-1]))
            reference = next((r["images_per_s"] for r in rows if r["model"] == "diffusers UNet2DModel"), None)
            for r in rows:
                ratio = f"{r['images_per_s'] / reference:.2f}x" if reference else "n/a"
                print(f"| {shape} | {precision} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['images_per_s']:.1f} | {ratio} | "
                      f"{r['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
