"""Training-step throughput of our U-Net against its peers at matched parameter count and resolution.

    python bench/train_throughput.py                          # MNIST and CIFAR-10 shapes, fp32 and bf16
    python bench/train_throughput.py --shapes mnist --precisions bf16 --seconds 5 --repeats 1
    python bench/train_throughput.py --from-run runs/cifar10 --peak-tflops 990   # a real run's logged speed and MFU

Peers: diffusers' ``UNet2DModel`` (``num_class_embeds``) and lucidrains' ``denoising-diffusion-pytorch``
classifier-free-guidance ``Unet`` (``pip install denoising-diffusion-pytorch``). A step is what training
does: forward (under bf16 autocast where asked), epsilon-MSE, backward, AdamW, EMA update (diffusers
``EMAModel``, foreach) — the same for all.
The peers are laid out as ours (channel multipliers, blocks per level, attention levels and heads, dropout,
where the peer lets us choose) and widened until their parameter count is the closest to ours (within about 1.5 %).
Each measurement runs in its own process, so peak memory (max RSS, or CUDA max allocated) is its own; the
models are measured in turn, ``--repeats`` times, and the median is printed with the ratio to diffusers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import load_config
from pipeline.models.build import build_unet
from pipeline.names import PROJECT_ROOT

# (channels, size, the config whose U-Net is ours at this shape)
SHAPES = {"mnist": (1, 28, "configs/quickstart-cpu.yaml"), "cifar10": (3, 32, "configs/cifar10.yaml")}
NUM_CLASSES = 10


def ours(shape: str, cfg_overrides: list[str], config: str | None = None) -> torch.nn.Module:
    """Our U-Net at ``shape``, from ``config`` (default: the shape's, ``SHAPES``) with ``cfg_overrides``."""
    channels, size, default = SHAPES[shape]
    cfg = load_config(PROJECT_ROOT / (config or default), cfg_overrides)
    return build_unet(cfg, size, channels, [str(i) for i in range(NUM_CLASSES)])


def diffusers_unet(mine: torch.nn.Module, width: int) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` laid out as ours: same multipliers, blocks per level, attention levels and heads,
    and dropout."""
    from diffusers import UNet2DModel

    c = mine.config
    attends = [c.sample_size // 2**level in c.attention_resolutions for level in range(len(c.channel_mult))]
    channels = [width * m for m in c.channel_mult]
    groups = next(g for g in range(32, 0, -1) if all(ch % g == 0 for ch in channels))
    heads_dim = next(ch for ch, a in zip(channels, attends, strict=True) if a) // c.attention_heads if any(attends) else None
    return UNet2DModel(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.in_channels, block_out_channels=channels,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        layers_per_block=c.layers_per_block, num_class_embeds=c.num_classes + 1, norm_num_groups=groups,
        attention_head_dim=heads_dim, dropout=c.dropout,
    )


def lucidrains_unet(mine: torch.nn.Module, width: int) -> torch.nn.Module:
    """lucidrains' classifier-free-guidance ``Unet`` with our multipliers (its depth and attention layout are fixed)."""
    from denoising_diffusion_pytorch.classifier_free_guidance import Unet

    c = mine.config
    return Unet(dim=width, num_classes=c.num_classes, dim_mults=tuple(c.channel_mult), channels=c.in_channels, cond_drop_prob=0.0)


PEERS = {"diffusers UNet2DModel": diffusers_unet, "lucidrains Unet": lucidrains_unet}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched(build, mine: torch.nn.Module) -> torch.nn.Module:
    """The peer at the (even) base width whose parameter count is the closest to ours."""
    target = count(mine)

    def distance(width: int) -> int:
        with torch.device("meta"):  # shapes only: counting a 100 M-parameter candidate allocates nothing
            return abs(count(build(mine, width)) - target)

    return build(mine, min(range(8, 257, 2), key=distance))


def forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x, t, y)  # ours and lucidrains take (x, t, classes); diffusers' third positional is class_labels
    return out.sample if hasattr(out, "sample") else out


@dataclass(frozen=True)
class Levers:
    """Speed levers of a training step (``bench/levers.py`` measures each one alone)."""

    channels_last: bool = False
    compile: bool = False
    fused_adamw: bool | None = None  # None: fused on CUDA, foreach elsewhere (what training does)
    ema_foreach: bool = True
    sync_every_step: bool = False  # loss.item() after every step, as naive loops log


def measure(model: torch.nn.Module, shape: str, batch: int, seconds: float, bf16: bool, device: torch.device,
            levers: Levers = Levers()) -> dict[str, float]:
    """Full training steps: two warm-up steps (``warmup_s``, which includes any compilation), then at least two
    steps and ``seconds``: ``{"images_per_s", "warmup_s"}``."""
    from diffusers.training_utils import EMAModel

    channels, size, _ = SHAPES[shape]
    memory_format = torch.channels_last if levers.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    fused = device.type == "cuda" if levers.fused_adamw is None else levers.fused_adamw
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    ema = EMAModel(model.parameters(), decay=0.999, foreach=levers.ema_foreach)
    step_model = torch.compile(model) if levers.compile else model
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g, device=device).contiguous(memory_format=memory_format)
    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g, device=device)
    steps, begun = -2, time.perf_counter()
    started = warmup_s = float("nan")  # set when the timed steps begin
    while steps < 2 or time.perf_counter() - started < seconds:
        if steps == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            warmup_s = started - begun
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = (forward(step_model, x, t, y).float() - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        if levers.sync_every_step:
            loss.item()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": batch * steps / (time.perf_counter() - started), "warmup_s": warmup_s}


def flops_per_image(model: torch.nn.Module, shape: str) -> float:
    """Floating-point operations of one training image, forward and backward (``torch.utils.flop_counter``,
    which counts matmuls, convolutions and attention: what the hardware's peak FLOP/s rates)."""
    from torch.utils.flop_counter import FlopCounterMode

    channels, size, _ = SHAPES[shape]
    batch = 2
    device = next(model.parameters()).device
    x = torch.randn(batch, channels, size, size, device=device)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)  # timesteps and labels
    with FlopCounterMode(display=False) as counter:
        forward(model, x, zeros, zeros).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def interleaved(commands: dict[str, list[str]], repeats: int) -> dict[str, list[dict]]:
    """Run each child command ``repeats`` times, in turn, so a slow spell of the machine hits every one; returns
    each one's results (the JSON object on the last line it prints)."""
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            runs[name].append(json.loads(subprocess.check_output(command, text=True).strip().splitlines()[-1]))
    return runs


def config_flags(args: argparse.Namespace) -> list[str]:
    """``--config`` and ``--override`` as a child process is passed them."""
    return [*(["--config", args.config] if args.config else []), *[f"--override={o}" for o in args.override]]


def one(args: argparse.Namespace) -> None:
    """Child process: build one model, measure it, print one JSON line."""
    device = torch.device(args.device)
    mine = ours(args.shape, args.override, args.config)
    model = (mine if args.model == "ours" else matched(PEERS[args.model], mine)).to(device)
    flops = flops_per_image(model, args.shape)
    images_per_s = measure(model, args.shape, args.batch, args.seconds, args.precision == "bf16", device)["images_per_s"]
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"model": args.model, "params": count(model), "images_per_s": images_per_s, "peak_mib": memory / 2**20,
                      "gflop_per_image": flops / 1e9}))


def from_run(run_dir: Path, peak_tflops: float | None) -> None:
    """One row for a real training run (``pipeline/train.py``): its logged images/s (median of the logs after the
    first, which includes start-up), GFLOP per image of its U-Net, TFLOP/s, MFU and peak memory (CUDA only)."""
    from pipeline.tensorboard_logs import read_scalars

    cfg = load_config(run_dir / "config.yaml")
    config = json.loads((run_dir / "pipeline" / "unet" / "config.json").read_text())
    channels, size = config["in_channels"], config["sample_size"]
    model = build_unet(cfg, size, channels, config["class_names"])
    shape = next(name for name, (c, s, _) in SHAPES.items() if (c, s) == (channels, size))
    gflop = flops_per_image(model, shape) / 1e9
    _, speeds = read_scalars(run_dir, "train/images_per_s")
    _, memory = read_scalars(run_dir, "train/peak_memory_gib")
    images_per_s = statistics.median(speeds[1:] or speeds)
    tflops = images_per_s * gflop / 1e3
    mfu = f"{100 * tflops / peak_tflops:.1f} %" if peak_tflops else "n/a"
    print("| run | params | GFLOP / image | images/s (median) | TFLOP/s | MFU | peak GiB |\n|---|---|---|---|---|---|---|")
    print(f"| {run_dir} | {count(model) / 1e6:.2f}M | {gflop:.2f} | {images_per_s:.1f} | {tflops:.3f} | {mfu} | "
          f"{max(memory) if memory else float('nan'):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mnist,cifar10")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--models", default="ours," + ",".join(PEERS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement (after 2 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per model, interleaved; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak (e.g. 989 for an H100/H200 in bf16): adds MFU")
    parser.add_argument("--config", help="the config whose U-Net is ours (default: the shape's, e.g. configs/cifar10.yaml)")
    parser.add_argument("--override", action="append", default=[], help="override of our config, e.g. --override=--model.upsample=nearest")
    parser.add_argument("--from-run", type=Path, help="report a finished pipeline/train.py run instead of measuring steps")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "SHAPE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_run:
        return from_run(args.from_run, args.peak_tflops)
    if args.one:
        args.model, args.shape, args.precision = args.one
        return one(args)

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} "
          f"seconds={args.seconds} repeats={args.repeats} config={args.config or 'of the shape'} overrides={args.override}")
    print("| shape | precision | model | params | GFLOP / image | images/s (median) | vs diffusers | TFLOP/s | MFU | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for precision in args.precisions.split(","):
            commands = {model: [sys.executable, __file__, "--one", model, shape, precision, "--batch", str(args.batch), "--seconds",
                                str(args.seconds), "--device", args.device, *config_flags(args)]
                        for model in args.models.split(",")}
            runs = interleaved(commands, args.repeats)
            rows = [{**r[0], "images_per_s": statistics.median(x["images_per_s"] for x in r), "peak_mib": max(x["peak_mib"] for x in r)}
                    for r in runs.values()]
            reference = next((r["images_per_s"] for r in rows if r["model"] == "diffusers UNet2DModel"), None)
            for r in rows:
                ratio = f"{r['images_per_s'] / reference:.2f}x" if reference else "n/a"
                tflops = r["images_per_s"] * r["gflop_per_image"] / 1e3
                mfu = f"{100 * tflops / args.peak_tflops:.1f} %" if args.peak_tflops else "n/a"
                print(f"| {shape} | {precision} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['gflop_per_image']:.2f} | "
                      f"{r['images_per_s']:.1f} | {ratio} | {tflops:.3f} | {mfu} | {r['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
