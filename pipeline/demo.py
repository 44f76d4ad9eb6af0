"""A Space-style web demo of a trained pipeline: pick classes, press Generate, see and download the images.

    python -m pipeline.demo                                  # data/pretrained/cifar10-cpu, else runs/quickstart/pipeline
    python -m pipeline.demo --pipeline runs/x/pipeline --port 7860

The page (Gradio, ``pip install -e '.[demo]'``) takes one or more classes by name, the guidance scale, sampler,
steps, seed, images per class and, optionally, a guidance ramp and interval (docs/samplers.md), and shows the grid
(one row per class), the reverse process (the predicted x_0 of the first image of each class at evenly spaced
steps, as in the seed paper's figure), and a zip of the PNGs.
Bad input is shown as a message on the page; the server keeps running. The same function is the
``/generate`` endpoint of the Gradio API (``gradio_client``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import SampleConfig
from pipeline.guidance import GUIDANCE_RAMPS
from pipeline.names import PROJECT_ROOT, SAMPLER_NAMES
from pipeline.sample_flags import sample_settings

if TYPE_CHECKING:  # torch, diffusers and gradio are imported once the command line is known to be good
    import PIL.Image
    import torch

    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

DEFAULT_PIPELINES = (PROJECT_ROOT / "data" / "pretrained" / "cifar10-cpu", PROJECT_ROOT / "runs" / "quickstart" / "pipeline")
MAX_PER_CLASS = 8
REVERSE_COLUMNS = 8
DISPLAY_SIZE = 96  # pixels per image on the page (MNIST's 28 would be tiny)


def default_pipeline() -> Path | None:
    """The committed pretrained pipeline if there is one, else the quickstart run's export, else None."""
    return next((path for path in DEFAULT_PIPELINES if (path / "model_index.json").is_file()), None)


class Generator:
    """Samples a pipeline for the page: ``__call__`` is the ``/generate`` endpoint."""

    def __init__(self, pipe: ConditionalDiffusionPipeline, bf16: bool, out_dir: Path):
        self.pipe, self.bf16, self.out_dir = pipe, bf16, out_dir

    def __call__(self, classes: list[str], guidance_scale: float, sampler: str, steps: float, seed: float,
                 per_class: float, guidance_ramp: str = "constant", guidance_interval: str = ""
                 ) -> tuple[PIL.Image.Image, PIL.Image.Image, str, str]:
        """-> (grid: one row per class, reverse process strip, zip of the PNGs, status line). ``guidance_interval``
        is ``LO,HI`` (guide only where sigma_t is in (LO, HI]) or empty for every step. Raises ValueError (shown on
        the page) for bad input."""
        import numpy as np
        import torch
        import torchvision

        from pipeline.sampling import sample_images

        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        steps, seed, per_class = _whole(steps, "steps"), _whole(seed, "seed"), _whole(per_class, "images per class")
        if not 1 <= per_class <= MAX_PER_CLASS:
            raise ValueError(f"images per class must be 1..{MAX_PER_CLASS}, got {per_class}")
        # decoded and checked as the command lines' flags are (ConfigError, a ValueError), then against this model;
        # an empty interval box is every step, not the run's interval
        settings = sample_settings(SampleConfig(), sampler=sampler, num_inference_steps=steps, guidance_scale=guidance_scale,
                                   guidance_ramp=guidance_ramp, guidance_interval=guidance_interval.strip() or "none")
        self.pipe.check_guidance(settings.guidance_scale, settings.guidance_interval, settings.guidance_ramp)
        started = time.perf_counter()
        autocast = torch.autocast(self.pipe.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            out = sample_images(self.pipe, settings, list(classes), seed, num_images_per_label=per_class, output_type="pt",
                                return_intermediates=True)
        seconds = time.perf_counter() - started
        grid = _image(torchvision.utils.make_grid(out.images, nrow=per_class, padding=2, pad_value=1.0), self._scale(out.images))
        picks = np.linspace(0, len(out.intermediates) - 1, min(REVERSE_COLUMNS, len(out.intermediates))).round().astype(int)
        firsts = slice(None, None, per_class)  # the first image of each class
        frames = torch.stack([out.intermediates[i][firsts] for i in picks], dim=1).flatten(0, 1)
        strip = _image(torchvision.utils.make_grid(frames, nrow=len(picks), padding=2, pad_value=1.0), self._scale(out.images))
        archive = self._archive(out.images, out.class_labels)
        message = (f"{len(out.images)} images ({', '.join(classes)}) in {seconds:.1f} s: {sampler}, {steps} steps, "
                   f"{settings.guidance_text()}, seed {seed}. Reverse process: predicted x_0 after step "
                   f"{', '.join(str(i + 1) for i in picks)} of {steps}.")
        return grid, strip, str(archive), message

    def _scale(self, images: torch.Tensor) -> int:
        return max(1, DISPLAY_SIZE // images.shape[-1])

    def _archive(self, images: torch.Tensor, labels: torch.Tensor) -> Path:
        """A zip of one PNG per image, named by class and index."""
        import torchvision

        folder = Path(tempfile.mkdtemp(dir=self.out_dir))
        names = self.pipe.class_names
        archive = folder / "samples.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
                png = folder / f"{i:03d}_{names[label]}.png"
                torchvision.utils.save_image(image, png)
                zf.write(png, png.name)
        return archive


def _whole(value: float, name: str) -> int:
    if value is None or float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(value)


def _image(grid: torch.Tensor, scale: int) -> PIL.Image.Image:
    """(C, H, W) in [0, 1] -> PIL image enlarged ``scale`` times (nearest: the pixels stay sharp)."""
    import PIL.Image
    import torch

    array = (grid.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = PIL.Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)


def build_demo(generator: Generator, defaults: SampleConfig, title: str):
    """The Gradio page around ``generator``."""
    import gradio as gr

    pipe = generator.pipe

    def generate(*args):
        try:
            return generator(*args)
        except ValueError as error:  # bad input: a message on the page, never a dead server
            raise gr.Error(str(error), print_exception=False) from None

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nPick one or more classes and press **Generate**. "
                    f"{pipe.unet.config.sample_size}x{pipe.unet.config.sample_size} images, sampled on this machine.")
        with gr.Row():
            with gr.Column(scale=1):
                classes = gr.CheckboxGroup(pipe.class_names, value=[pipe.class_names[0]], label="Classes", elem_id="classes")
                guidance = gr.Slider(0.0, 10.0, value=defaults.guidance_scale if pipe.unet.null_class is not None else 1.0,
                                     step=0.5, label="Guidance scale (1 = none)", interactive=pipe.unet.null_class is not None)
                guided = pipe.unet.null_class is not None
                ramp = gr.Dropdown(list(GUIDANCE_RAMPS), value=defaults.guidance_ramp, label="Guidance ramp (its mean is the scale)",
                                   interactive=guided)
                interval = gr.Textbox(value=",".join(f"{v:g}" for v in defaults.guidance_interval or ()), placeholder="every step",
                                      label="Guidance interval LO,HI (noise levels sigma guided)", interactive=guided)
                sampler = gr.Dropdown(list(SAMPLER_NAMES), value=defaults.sampler, label="Sampler")
                steps = gr.Number(value=defaults.num_inference_steps, precision=0, label="Steps")
                seed = gr.Number(value=0, precision=0, label="Seed")
                per_class = gr.Slider(1, MAX_PER_CLASS, value=4, step=1, label="Images per class")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                grid = gr.Image(label="Samples (one row per class)", type="pil", format="png", elem_id="grid")
                strip = gr.Image(label="Reverse process (predicted x_0)", type="pil", format="png", elem_id="reverse")
                download = gr.File(label="Download the images (zip of PNGs)", elem_id="download")
        button.click(generate, [classes, guidance, sampler, steps, seed, per_class, ramp, interval], [grid, strip, download, status],
                     api_name="generate")
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="an exported pipeline (default: data/pretrained/cifar10-cpu, else runs/quickstart/pipeline)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    folder = args.pipeline or default_pipeline()
    if folder is None or not (folder / "model_index.json").is_file():
        where = folder or " or ".join(str(path) for path in DEFAULT_PIPELINES)
        print(f"error: no exported pipeline at {where}; pass --pipeline DIR (a training run's pipeline/ folder)", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
    from pipeline.sampling import saved_run_config

    pipe = ConditionalDiffusionPipeline.from_pretrained(folder)
    run = saved_run_config(folder)
    out_dir = Path(tempfile.mkdtemp(prefix="ddpm-demo-"))
    generator = Generator(pipe, bf16=run.train.mixed_precision == "bf16", out_dir=out_dir)
    demo = build_demo(generator, run.sample, title=f"Class-conditional DDPM: {folder}")
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out_dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
