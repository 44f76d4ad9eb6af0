"""The plain diffusers recipe, trained on the same data, budget and machine as ours, and scored the same way.

    python bench/diffusers_recipe.py --config configs/cifar10-cpu.yaml --minutes 90 --output-dir runs/peer-cifar10
    python bench/diffusers_recipe.py --config configs/cifar10-cpu.yaml --output-dir runs/peer-cifar10 --skip-training \\
        --per-class 500 --metrics accuracy,cfid,fid --ref-split test --ref-samples all

The peer is diffusers' ``UNet2DModel`` with ``num_class_embeds``, laid out like our config's U-Net and widened to
its parameter count (``bench/train_throughput.py``), trained as diffusers'
``examples/unconditional_image_generation/train_unconditional.py`` trains: epsilon-prediction on a linear
1000-step ``DDPMScheduler``, AdamW (lr 1e-4, betas 0.95/0.999, weight decay 1e-6, eps 1e-8), a cosine schedule
with 500 warm-up steps over the run, gradient clipping at 1.0, random flips where our config flips, and an
``EMAModel`` (max decay 0.9999, warm-up inv_gamma 1, power 3/4). Taken from our config so that only the recipe
differs: the data, batch size, bf16 autocast, and label dropout to a null class (``diffusion.p_uncond``), which
the plain recipe lacks but which lets the peer be sampled with the same classifier-free guidance as ours.

The cosine schedule needs a length: it is the number of steps that fit in ``--minutes`` at the speed of a
few calibration steps, and training stops at that step or at the time limit, whichever comes first. The EMA
weights are saved to ``<output-dir>/unet`` and scored with our sampler, steps and guidance (``--per-class``,
``--metrics``), through ``ConditionalDiffusionPipeline`` and ``pipeline.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import FrozenDict
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from bench.train_throughput import diffusers_unet, matched
from pipeline import ConditionalDiffusionPipeline, load_config
from pipeline.config import Config, DiffusionConfig
from pipeline.data import flip_where, load_image_data, to_model_range
from pipeline.diffusion import make_train_scheduler
from pipeline.evaluation.metrics import Evaluator, evaluate, hardware, markdown_table, parse_metrics
from pipeline.models.build import build_unet
from pipeline.sample_flags import add_score_flags, score_reference

WARMUP_STEPS = 500
PEER_DIFFUSION = DiffusionConfig(schedule="linear", num_train_timesteps=1000, prediction_type="epsilon")
CALIBRATION_STEPS = 3


class PeerUNet(torch.nn.Module):
    """A diffusers ``UNet2DModel`` behind ``ConditionalUNet``'s interface (its config fields and ``null_class``),
    so ``ConditionalDiffusionPipeline`` samples it exactly as it samples ours."""

    def __init__(self, unet: UNet2DModel, class_names: list[str]):
        super().__init__()
        self.unet = unet
        # A FrozenDict, as every diffusers model's config is: the pipeline reads it both as attributes and with .get.
        self.config = FrozenDict(**unet.config, num_classes=len(class_names), class_names=class_names, learned_variance=False)
        self.null_class = len(class_names)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        return self.unet(sample, timestep, class_labels=class_labels)


def train_peer(cfg: Config, output_dir: Path, minutes: float) -> dict:
    """Train the peer for ``minutes`` of wall time (calibration included); save its EMA U-Net to ``output_dir/unet``."""
    started = time.perf_counter()
    t = cfg.train
    data = load_image_data(cfg.data)
    torch.manual_seed(t.seed)
    ours = build_unet(cfg, data.size, data.channels, data.class_names)
    model = matched(diffusers_unet, ours).train()
    noise_scheduler = make_train_scheduler(PEER_DIFFUSION)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    generator = torch.Generator().manual_seed(t.seed)
    autocast = torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                              enabled=t.mixed_precision == "bf16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    order: list[torch.Tensor] = []  # a fresh shuffle each epoch, as the example's DataLoader(shuffle=True)

    def step(lr_scheduler) -> float:
        if not order:
            order.extend(torch.randperm(len(data), generator=generator).split(t.batch_size)[: len(data) // t.batch_size])
        index = order.pop(0)
        clean = to_model_range(data.images[index])
        if cfg.data.random_flip:
            clean = flip_where(clean, torch.rand(t.batch_size, generator=generator) < 0.5)
        dropped = torch.rand(t.batch_size, generator=generator) < cfg.diffusion.p_uncond
        labels = torch.where(dropped, len(data.class_names), data.labels[index])
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (t.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with autocast:
            prediction = model(noisy.to(device), timesteps.to(device), class_labels=labels.to(device)).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return loss.item()

    # Calibrate: time a few real steps (at warm-up learning rates), then fix the schedule's length to the budget.
    warmup_only = get_scheduler("cosine", optimizer, num_warmup_steps=WARMUP_STEPS, num_training_steps=10**9)
    step(warmup_only)
    calibration_start = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        step(warmup_only)
    seconds_per_step = (time.perf_counter() - calibration_start) / CALIBRATION_STEPS
    done = CALIBRATION_STEPS + 1
    total_steps = done + int((minutes * 60 - (time.perf_counter() - started)) / seconds_per_step)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=WARMUP_STEPS, num_training_steps=total_steps,
                                 last_epoch=done - 1)
    losses = []
    while done < total_steps and time.perf_counter() - started < minutes * 60:
        losses.append(step(lr_scheduler))
        done += 1
        if done % 100 == 0:
            print(f"peer step {done}/{total_steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                  f"({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
    ema.copy_to(model.parameters())
    model.eval().save_pretrained(str(output_dir / "unet"))
    noise_scheduler.save_pretrained(str(output_dir / "scheduler"))
    summary = {"steps": done, "planned_steps": total_steps, "images_seen": done * t.batch_size, "wall_s": time.perf_counter() - started,
               "params": sum(p.numel() for p in model.parameters()), "ours_params": sum(p.numel() for p in ours.parameters()),
               "class_names": data.class_names}
    (output_dir / "peer.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def peer_pipeline(output_dir: Path) -> ConditionalDiffusionPipeline:
    """The trained peer in our pipeline (same samplers, guidance and evaluation as ours)."""
    from diffusers import DDPMScheduler

    summary = json.loads((output_dir / "peer.json").read_text())
    unet = PeerUNet(UNet2DModel.from_pretrained(str(output_dir / "unet")), summary["class_names"])
    return ConditionalDiffusionPipeline(unet=unet.eval(), scheduler=DDPMScheduler.from_pretrained(str(output_dir / "scheduler")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="our config: data, batch size, precision and the U-Net to match")
    parser.add_argument("--minutes", type=float, default=90.0)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--skip-training", action="store_true", help="score an existing peer in --output-dir")
    parser.add_argument("--per-class", type=int, default=100)
    add_score_flags(parser)
    parser.add_argument("--json", help="write the result here")
    args, overrides = parser.parse_known_args()
    cfg = load_config(args.config, overrides)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.skip_training:
        print(json.dumps(train_peer(cfg, output_dir, args.minutes)))
    evaluator = Evaluator(cfg.data.dataset, parse_metrics(args.metrics), reference=score_reference(args, cfg.data.dataset))
    result = evaluate(peer_pipeline(output_dir), evaluator, args.per_class, cfg.sample, baselines=False)
    result.update(peer=json.loads((output_dir / "peer.json").read_text()), hardware=hardware())
    print(markdown_table(result["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
