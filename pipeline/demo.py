"""A Space-style web demo of a trained pipeline: pick classes, press Generate, see and download the images.

    python -m pipeline.demo                                  # the first of DEFAULT_PIPELINES that is there
    python -m pipeline.demo --pipeline runs/x/pipeline --port 7860

The page (Gradio, ``pip install -e '.[demo]'``) takes one or more classes by name, the guidance scale, sampler,
steps, seed, images per class and, optionally, a guidance ramp and interval (docs/samplers.md), and shows the grid
(one row per class), the reverse process (the predicted x_0 of the first image of each class at evenly spaced
steps, as in the seed paper's figure), and a zip of the PNGs. A distilled student (``python -m pipeline.distill``)
comes with a switch to its teacher (``distill.teacher`` of its config, where that folder is here): the page opens on
the student, and each model brings its own sampler, steps and guidance.
Bad input is a message in the page's status line, in the page's own words (``LABELS``), in place of the last
result; the server keeps running. The same function is the ``/generate`` endpoint of the Gradio API
(``gradio_client``), where bad input is an error (``AppError``). The page's title names the pipeline by its run's or
folder's name, or its hub id, never by a path of this machine. One request's work is bounded (``MAX_STEPS``,
``MAX_IMAGES``, ``MAX_IMAGE_STEPS``; a class asked for twice is sampled once) and requests queue one at a time, at most
``QUEUE_SIZE`` waiting. Files do not pile up: a request's zip goes when the next one writes its own, Gradio's copies of
the images and zips after ``CACHE_AGE_S``, and everything when the server stops (Ctrl+C or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import SampleConfig
from pipeline.errors import ConfigError
from pipeline.guidance import GUIDANCE_RAMPS
from pipeline.names import PROJECT_ROOT, SAMPLER_NAMES
from pipeline.sample_flags import is_hub_id, pipeline_location, sample_settings

if TYPE_CHECKING:  # torch, diffusers and gradio are imported once the command line is known to be good
    import PIL.Image
    import torch

    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

# the 4-step student first: it opens the page with a switch to its teacher, the next one
DEFAULT_PIPELINES = tuple(PROJECT_ROOT / folder for folder in ("data/pretrained/cifar10-cpu-4step", "data/pretrained/cifar10-cpu",
                                                               "runs/quickstart/pipeline"))
MAX_PER_CLASS = 8
MAX_STEPS = 1000  # the length of the training schedule (diffusion.num_train_timesteps' default)
MAX_IMAGES = 80  # one U-Net batch per request: ten classes of eight
MAX_IMAGE_STEPS = 8000  # images x steps, the work (and the reverse process kept in memory): 80 at 100 steps, 8 at 1000
MAX_SEED = 2**32 - 1
QUEUE_SIZE = 16  # requests waiting behind the one being served; more are told the queue is full
CACHE_SWEEP_S, CACHE_AGE_S = 600, 3600  # Gradio deletes its copies of the images and zips an hour after a request
NAME_CHARS = 48  # of a class name in a file name (the index keeps names unique)
REVERSE_COLUMNS = 8
DISPLAY_SIZE = 96  # pixels per image on the page (MNIST's 28 would be tiny)
# What the page calls its fields: each component's label starts with its name here, and the page's messages name the
# fields so (page_message)
LABELS = {"model": "Model", "classes": "Classes", "guidance_scale": "Guidance scale", "guidance_ramp": "Guidance ramp",
          "guidance_interval": "Guidance interval", "sampler": "Sampler", "steps": "Steps", "seed": "Seed",
          "per_class": "Images per class"}
# the names the shared checks (sampling settings, the pipeline's arguments) give the same fields -> LABELS' keys
CODE_NAMES = {"class_labels": "classes", "guidance_scale": "guidance_scale", "guidance_ramp": "guidance_ramp",
              "guidance_interval": "guidance_interval", "sampler": "sampler", "num_inference_steps": "steps",
              "num_images_per_label": "per_class"}


def default_pipeline() -> Path | None:
    """The first of ``DEFAULT_PIPELINES`` that holds an export (committed pretrained ones, else the quickstart's), or None."""
    return next((path for path in DEFAULT_PIPELINES if (path / "model_index.json").is_file()), None)


@dataclass
class Model:
    """A pipeline the page samples: its sampling defaults (its run's ``sample`` section) and whether it samples in bf16
    (its run trained in bf16)."""

    pipe: ConditionalDiffusionPipeline
    bf16: bool
    defaults: SampleConfig


def teacher_of(config_teacher: str | None) -> Path | None:
    """A student's teacher folder (its config's ``distill.teacher``) as a path here: as given, else under the project
    (where ``python -m pipeline.distill`` ran); None for no student or a teacher that is not here."""
    if not config_teacher:
        return None
    return next((path for path in (Path(config_teacher), PROJECT_ROOT / config_teacher) if (path / "model_index.json").is_file()),
                None)


class Generator:
    """Samples the page's models (name -> ``Model``; the first is the default): ``__call__`` is the ``/generate``
    endpoint. ``out_dir`` is its own folder, emptied when a request writes its zip: requests are served one at a time
    (``main``'s queue), so by then Gradio has copied the previous one's zip to its cache."""

    def __init__(self, models: dict[str, Model], out_dir: Path):
        self.models, self.out_dir = models, out_dir

    def model(self, name: str = "") -> Model:
        """The model called ``name`` (empty: the default); ValueError naming the choices for another name."""
        if not name:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ValueError(f"{LABELS['model']}: no model {name!r} here; choose one of {', '.join(map(repr, self.models))}")
        return self.models[name]

    def __call__(self, classes: list[str], guidance_scale: float, sampler: str, steps: float, seed: float,
                 per_class: float, guidance_ramp: str = "constant", guidance_interval: str = "", model: str = ""
                 ) -> tuple[PIL.Image.Image, PIL.Image.Image, str, str]:
        """-> (grid: one row per class, reverse process strip, zip of the PNGs, status line). ``guidance_interval``
        is ``LO,HI`` (guide only where sigma_t is in (LO, HI]) or empty for every step; ``model`` one of the page's
        models (empty: the default). Raises ValueError (shown on the page) for bad input."""
        import numpy as np
        import torch
        import torchvision

        from pipeline.sampling import sample_images
        from pipeline.student_card import sampling_evaluations

        chosen = self.model(model)
        classes = list(dict.fromkeys(classes or ()))  # a class asked for twice is sampled once
        steps = _whole(steps, LABELS["steps"], 1, MAX_STEPS)
        seed = _whole(seed, LABELS["seed"], 0, MAX_SEED)
        per_class = _whole(per_class, LABELS["per_class"], 1, MAX_PER_CLASS)
        _check_work(len(classes), per_class, steps)
        # decoded and checked as the command lines' flags are (ConfigError, a ValueError), then against this model;
        # an empty interval box is every step, not the run's interval
        settings = sample_settings(SampleConfig(), sampler=sampler, num_inference_steps=steps, guidance_scale=guidance_scale,
                                   guidance_ramp=guidance_ramp, guidance_interval=(guidance_interval or "").strip() or "none")
        chosen.pipe.check_guidance(settings.guidance_scale, settings.guidance_interval, settings.guidance_ramp)
        started = time.perf_counter()
        autocast = torch.autocast(chosen.pipe.device.type, dtype=torch.bfloat16) if chosen.bf16 else contextlib.nullcontext()
        with autocast:
            out = sample_images(chosen.pipe, settings, classes, seed, num_images_per_label=per_class, output_type="pt",
                                return_intermediates=True)
        seconds = time.perf_counter() - started
        grid = _image(torchvision.utils.make_grid(out.images, nrow=per_class, padding=2, pad_value=1.0), self._scale(out.images))
        picks = np.linspace(0, len(out.intermediates) - 1, min(REVERSE_COLUMNS, len(out.intermediates))).round().astype(int)
        firsts = slice(None, None, per_class)  # the first image of each class
        frames = torch.stack([out.intermediates[i][firsts] for i in picks], dim=1).flatten(0, 1)
        strip = _image(torchvision.utils.make_grid(frames, nrow=len(picks), padding=2, pad_value=1.0), self._scale(out.images))
        archive = self._archive(out.images, out.class_labels, chosen.pipe.class_names)
        evaluations = sampling_evaluations(settings, student=chosen.pipe.is_student)
        which = f"{model or next(iter(self.models))}: " if len(self.models) > 1 else ""
        message = (f"{which}{len(out.images)} images ({', '.join(classes)}) in {seconds:.1f} s: {sampler}, {steps} steps, "
                   f"{settings.guidance_text()}, seed {seed}, {evaluations} U-Net evaluations per image. Reverse process: "
                   f"predicted x_0 after step {', '.join(str(i + 1) for i in picks)} of {steps}.")
        return grid, strip, str(archive), message

    def _scale(self, images: torch.Tensor) -> int:
        return max(1, DISPLAY_SIZE // images.shape[-1])

    def _archive(self, images: torch.Tensor, labels: torch.Tensor, names: list[str]) -> Path:
        """A zip of one PNG per image (``png_name``) in a fresh folder of ``out_dir``, after removing the earlier
        requests' folders (Gradio serves its own copies of their zips)."""
        import torchvision

        for old in self.out_dir.iterdir():
            shutil.rmtree(old, ignore_errors=True)
        archive = Path(tempfile.mkdtemp(dir=self.out_dir)) / "samples.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
                png = io.BytesIO()  # straight into the zip: no loose files
                torchvision.utils.save_image(image, png, format="PNG")
                zf.writestr(png_name(i, names[label]), png.getvalue())
        return archive


def png_name(index: int, class_name: str) -> str:
    """``003_T-shirt_top.png``: the image's index (which keeps names unique) and its class, every run of characters
    other than letters, digits, ``-``, ``.`` and ``_`` as one ``_`` (a ``/`` would be a folder in the zip), cut to
    ``NAME_CHARS``."""
    readable = re.sub(r"[^\w.-]+", "_", class_name).strip("._")[:NAME_CHARS]
    return f"{index:03d}_{readable or 'class'}.png"


def _whole(value: object, name: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``lo..hi``; ValueError naming the field for anything else (an empty box, text, 2.5,
    NaN, inf)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number == int(number) and lo <= number <= hi):
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value}")
    return int(number)


def _check_work(classes: int, per_class: int, steps: int) -> None:
    """ValueError unless one request of ``classes`` x ``per_class`` images at ``steps`` steps is within the caps."""
    if not classes:
        raise ValueError(f"{LABELS['classes']}: none ticked; tick at least one class")
    images = classes * per_class
    if images > MAX_IMAGES:
        raise ValueError(f"{classes} classes x {per_class} images is {images} images, more than one request may ask for "
                         f"({MAX_IMAGES}); tick fewer classes or ask for fewer images per class")
    if images * steps > MAX_IMAGE_STEPS:
        raise ValueError(f"{images} images x {steps} steps is more work than one request may ask for (at most "
                         f"{MAX_IMAGE_STEPS} image-steps, e.g. {MAX_IMAGES} images at {MAX_IMAGE_STEPS // MAX_IMAGES} steps "
                         f"or {MAX_IMAGE_STEPS // MAX_STEPS} at {MAX_STEPS}); ask for fewer images or fewer steps")


def _image(grid: torch.Tensor, scale: int) -> PIL.Image.Image:
    """(C, H, W) in [0, 1] -> PIL image enlarged ``scale`` times (nearest: the pixels stay sharp)."""
    import PIL.Image
    import torch

    array = (grid.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = PIL.Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)


def page_message(text: str) -> str:
    """A refusal as the page shows it: the code's names of its fields (``CODE_NAMES``: ``guidance_interval``,
    ``class_labels``) replaced by the labels the page shows (``LABELS``: Guidance interval, Classes)."""
    return re.sub(r"\b(?:" + "|".join(CODE_NAMES) + r")\b", lambda match: LABELS[CODE_NAMES[match[0]]], text)


def display_name(location: str | Path) -> str:
    """What the page calls the pipeline at ``location``: a hub id as it is, a training run's ``pipeline/`` folder by
    the run's name, any other folder by its own; never a path of this machine."""
    if is_hub_id(str(location)) and not Path(location).exists():
        return str(location)
    folder = Path(location).resolve()
    return folder.parent.name if folder.name == "pipeline" else folder.name


def build_demo(generator: Generator, title: str):
    """The Gradio page around ``generator``, set to its default model's sampling settings; with more than one model a
    switch that sets the fields to the chosen model's. Its button shows a refusal in the status line in place of the
    last result (images cleared); the ``/generate`` endpoint, the same function behind a hidden button, raises it for
    the API's clients. Both queue as one: one request at a time."""
    import gradio as gr

    first = generator.model()
    pipe, defaults = first.pipe, first.defaults

    def generate(*args):
        try:
            return generator(*args)
        except ValueError as error:  # bad input: an error for the API's client, never a dead server
            raise gr.Error(page_message(str(error)), print_exception=False) from None

    def generate_on_page(*args):
        try:
            return generator(*args)
        except ValueError as error:  # bad input: only the message, in the status line, where the result would be
            return None, None, None, f"**Error:** {page_message(str(error))}"

    with gr.Blocks(title=title, delete_cache=(CACHE_SWEEP_S, CACHE_AGE_S)) as demo:
        gr.Markdown(f"# {title}\nPick one or more classes and press **Generate**. "
                    f"{pipe.unet.config.sample_size}x{pipe.unet.config.sample_size} images, sampled on this machine.")
        with gr.Row():
            with gr.Column(scale=1):
                names = list(generator.models)
                model = gr.Radio(names, value=names[0], label=LABELS["model"], visible=len(names) > 1, elem_id="model")
                classes = gr.CheckboxGroup(pipe.class_names, value=[pipe.class_names[0]], label=LABELS["classes"], elem_id="classes")
                guided = pipe.unet.null_class is not None
                guidance = gr.Slider(0.0, 10.0, value=defaults.guidance_scale if guided else 1.0, step=0.5,
                                     label=f"{LABELS['guidance_scale']} (1 = none)", interactive=guided)
                ramp = gr.Dropdown(list(GUIDANCE_RAMPS), value=defaults.guidance_ramp,
                                   label=f"{LABELS['guidance_ramp']} (its mean is the scale)", interactive=guided)
                interval = gr.Textbox(value=",".join(f"{v:g}" for v in defaults.guidance_interval or ()), placeholder="every step",
                                      label=f"{LABELS['guidance_interval']} LO,HI (noise levels sigma guided)", interactive=guided,
                                      elem_id="interval")
                sampler = gr.Dropdown(list(SAMPLER_NAMES), value=defaults.sampler, label=LABELS["sampler"])
                # no rounding by Gradio (precision=0 fails on inf and NaN before the check): Generator checks each value
                steps = gr.Number(value=defaults.num_inference_steps, label=f"{LABELS['steps']} (1 to {MAX_STEPS})", elem_id="steps")
                seed = gr.Number(value=0, label=LABELS["seed"])
                per_class = gr.Slider(1, MAX_PER_CLASS, value=4, step=1, label=LABELS["per_class"])
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                api_button = gr.Button(visible=False)  # the /generate endpoint's trigger: the API's clients call it
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                grid = gr.Image(label="Samples (one row per class)", type="pil", format="png", elem_id="grid")
                strip = gr.Image(label="Reverse process (predicted x_0)", type="pil", format="png", elem_id="reverse")
                download = gr.File(label="Download the images (zip of PNGs)", elem_id="download")
        inputs, outputs = [classes, guidance, sampler, steps, seed, per_class, ramp, interval, model], [grid, strip, download, status]

        def switch(name: str):  # the chosen model's own sampler, steps and guidance
            chosen = generator.model(name).defaults
            return chosen.sampler, chosen.num_inference_steps, chosen.guidance_scale

        model.change(switch, model, [sampler, steps, guidance], api_visibility="private")
        button.click(generate_on_page, inputs, outputs, api_visibility="private", concurrency_id="generate")
        api_button.click(generate, inputs, outputs, api_name="generate", concurrency_id="generate")
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=None, help="an exported pipeline folder or hub id (default: the first of "
                                                         + ", ".join(str(p.relative_to(PROJECT_ROOT)) for p in DEFAULT_PIPELINES)
                                                         + " that is there)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    try:
        location = pipeline_location(args.pipeline) if args.pipeline else default_pipeline()
    except ConfigError as error:  # no such folder, or no export in it: one line (the same check as evaluate's)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if location is None:
        print(f"error: no exported pipeline at {' or '.join(map(str, DEFAULT_PIPELINES))}; pass --pipeline DIR (a training "
              "run's pipeline/ folder)", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
    from pipeline.sampling import saved_run_config

    def load(where: str | Path) -> Model:
        run = saved_run_config(where)
        return Model(ConditionalDiffusionPipeline.from_pretrained(where), run.train.mixed_precision == "bf16", run.sample)

    opened = load(location)
    models = {display_name(location): opened}
    if opened.pipe.is_student and (teacher := teacher_of(saved_run_config(location).distill.teacher)):
        models = {f"{display_name(location)} (distilled student)": opened, f"{display_name(teacher)} (its teacher)": load(teacher)}
    signal.signal(signal.SIGTERM, _stop)
    with tempfile.TemporaryDirectory(prefix="ddpm-demo-") as out_dir:  # removed when the server stops
        generator = Generator(models, out_dir=Path(out_dir))
        demo = build_demo(generator, title=f"Class-conditional DDPM: {display_name(location)}")
        demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE).launch(server_name=args.host, server_port=args.port,
                                                                            allowed_paths=[out_dir])
    return 0


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (kill, docker stop) stops the server as Ctrl+C does, so that it deletes its files on the way out."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
