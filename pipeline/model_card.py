"""The model card of an export: ``README.md`` in the style of diffusers' training examples (``save_model_card``)
and the sample grid it shows (``samples.png``), written beside ``model_index.json``.

The card has YAML metadata for the Hugging Face hub, the code files the folder ships, the loading snippet (plain
diffusers and this project), the data set, steps and images seen, the training command, the resolved config, and
the last in-training evaluation metrics (``eval/*`` in the run's TensorBoard logs) if there are any; a published
copy adds what ``evaluate`` measured (``measured_section``). Names that come from the data or the user (class names,
the data set, the command) are escaped (``markdown_text``, ``code_span``, ``fenced``, ``front_matter``): a class
named ``<script>`` or ``[x](http://...)`` is shown as written, never rendered as HTML, a link or a heading.
"""

from __future__ import annotations

import html
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import Config, SampleConfig
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline

GRID_FILE = "samples.png"
GRID_PER_CLASS = 8
# the hub's nearest task: it has no class-conditional image generation tag
PIPELINE_TAG = "unconditional-image-generation"
LICENSE = "apache-2.0"  # as diffusers' own training examples release their models
TAGS = ("diffusers", "diffusers-training", "class-conditional", "ddpm", "classifier-free-guidance")
CODE_SENTENCE_START = "With only `torch` and `diffusers` installed (the folder ships its code: "


@dataclass
class TrainingRecord:
    """What a model card says about the training that produced the export."""

    config: Config
    step: int
    images_seen: int
    run_dir: Path
    command: str | None = None  # as launched; None when unknown (an export written after the run)

    @classmethod
    def of_run(cls, run_dir: Path, config: Config) -> TrainingRecord:
        """A finished run's record from its ``status.json`` (the step; images seen = step x global batch)."""
        status = run_dir / "status.json"
        step = json.loads(status.read_text())["step"] if status.is_file() else 0
        return cls(config=config, step=step, images_seen=step * config.train.batch_size, run_dir=run_dir)

    @classmethod
    def of_this_process(cls, config: Config, step: int, images_seen: int) -> TrainingRecord:
        """The record of the training running in this process (its command line from ``sys.orig_argv``)."""
        return cls(config=config, step=step, images_seen=images_seen, run_dir=Path(config.train.output_dir),
                   command=shlex.join(sys.orig_argv))


def write_model_card(pipe: ConditionalDiffusionPipeline, directory: Path, record: TrainingRecord) -> Path:
    """Write ``directory/README.md`` and ``directory/samples.png`` (one row of samples per class) into an export whose
    code is already in place (the card names it). Returns the card."""
    from pipeline.figures import class_grid

    sample = record.config.sample
    class_grid(pipe, directory / GRID_FILE, per_class=GRID_PER_CLASS, sample=sample, seed=record.config.train.seed)
    card = directory / "README.md"
    card.write_text(model_card_text(pipe, record, last_metrics(record.run_dir), shipped_code(directory)))
    return card


def shipped_code(directory: Path) -> list[str]:
    """The code files of the export ``directory``, relative to it: its own, then its subfolders', by name."""
    files = (path.relative_to(directory) for path in directory.rglob("*.py"))
    return [str(path) for path in sorted(files, key=lambda path: (len(path.parts), str(path)))]


def code_sentence(code: list[str]) -> str:
    """The card's line that introduces the loading snippet and names the ``code`` files the folder ships."""
    names = [f"`{name}`" for name in code]
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
    return f"{CODE_SENTENCE_START}{listed}):"


def with_shipped_code(card: str, code: list[str]) -> str:
    """``card`` with its list of shipped files (``code_sentence``) naming ``code`` instead (``pipeline.export
    --update-code``); the rest of the card is unchanged."""
    return "\n".join(code_sentence(code) if line.startswith(CODE_SENTENCE_START) else line for line in card.split("\n"))


def measured_section(result: dict, sample: SampleConfig) -> str:
    """The card's ``## Measured`` section: how the ``evaluate --out`` JSON ``result`` was measured, and its table."""
    from pipeline.evaluation.metrics import markdown_table

    reference = result["reference"]
    return "\n".join([
        "## Measured", "",
        f"`python -m pipeline.evaluation evaluate` ({result['per_class']} samples per class, {sample.sampler} "
        f"{sample.num_inference_steps} steps, {sample.guidance_text()}; distances against the "
        f"{reference['split']} split, {reference['max_samples'] or 'all'} images; {result.get('hardware', '')}; "
        "`metrics.json` has every number):", "",
        markdown_table(result["rows"]),
    ])


def last_metrics(run_dir: Path) -> dict[str, tuple[int, float]]:
    """The last value of every ``eval/*`` scalar in the run's TensorBoard logs: tag -> (step, value)."""
    from pipeline.tensorboard_logs import scalar_points

    points = scalar_points(run_dir / "tensorboard") if (run_dir / "tensorboard").is_dir() else {}
    return {tag: (step := max(series), series[step]) for tag, series in sorted(points.items()) if tag.startswith("eval/")}


def dataset_id(dataset: str) -> str:
    """The data set's name for the hub metadata: a hub id as given, a local folder by its name."""
    return Path(dataset).name if Path(dataset).is_absolute() or Path(dataset).exists() or dataset.startswith(".") else dataset


def sampler_snippet(pipe: ConditionalDiffusionPipeline, sampler: str) -> tuple[str, str]:
    """(scheduler class name, the diffusers line that installs the run's sampler with
    ``pipeline.diffusion.make_sampler``'s settings)."""
    from pipeline.diffusion import make_sampler

    scheduler = make_sampler(sampler, dict(pipe.scheduler.config))
    name = type(scheduler).__name__
    default = type(scheduler).from_config(pipe.scheduler.config).config
    changed = {key: value for key, value in scheduler.config.items() if not key.startswith("_") and default.get(key) != value}
    arguments = "".join(f", {key}={value!r}" for key, value in sorted(changed.items()))
    return name, f"pipe.scheduler = {name}.from_config(pipe.scheduler.config{arguments})"


def guidance_arguments(sample: SampleConfig) -> str:
    """The pipeline call's ``guidance_interval`` and ``guidance_ramp`` arguments where ``sample`` sets them, for the
    snippet (an infinite bound as ``float("inf")``, which needs no import)."""
    arguments = ""
    if sample.guidance_interval is not None:
        bounds = [repr(x) if math.isfinite(x) else 'float("inf")' for x in sample.guidance_interval]
        arguments += f", guidance_interval=({', '.join(bounds)})"
    if sample.guidance_ramp != "constant":
        arguments += f", guidance_ramp={sample.guidance_ramp!r}"
    return arguments


def loading_snippet(pipe: ConditionalDiffusionPipeline, sample: SampleConfig) -> str:
    """The card's Python: load the folder with plain diffusers, install the run's sampler, sample its first two classes
    with the run's settings."""
    scheduler_name, scheduler_line = sampler_snippet(pipe, sample.sampler)
    return "\n".join([
        "import torch",
        f"from diffusers import DiffusionPipeline, {scheduler_name}",
        "",
        'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        scheduler_line + "  # the default is 1000-step DDPM",
        f"images = pipe(class_labels={pipe.class_names[:2]!r}, num_images_per_label=4, guidance_scale={sample.guidance_scale}, "
        f"num_inference_steps={sample.num_inference_steps}{guidance_arguments(sample)}, generator=torch.manual_seed(0)).images",
    ])


def markdown_text(text: str) -> str:
    """``text`` as literal inline Markdown: whitespace runs (line breaks included) as one space, so that it cannot
    start a line (a heading, a list, a fence); the characters of emphasis, code, links, images, tables and
    strikethrough backslash-escaped; ``&``, ``<`` and ``>`` as HTML entities (no tags, no entities of its own)."""
    flat = " ".join(text.split())
    return html.escape(re.sub(r"([\\`*_\[\]()!|~])", r"\\\1", flat), quote=False)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall("`+", text)), default=0)


def code_span(text: str) -> str:
    """``text`` as one inline code span (shown verbatim, HTML included) whatever backticks it holds: delimited by a
    longer backtick run than any inside (CommonMark), its line breaks as spaces."""
    flat = " ".join(text.splitlines())
    ticks = "`" * (_longest_backtick_run(flat) + 1)
    padded = f" {flat} " if flat.startswith("`") or flat.endswith("`") else flat
    return f"{ticks}{padded}{ticks}"


def fenced(text: str, language: str) -> list[str]:
    """``text`` as the lines of a fenced code block whose fence is longer than any backtick run in it, so that no
    line of ``text`` can close it."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return [fence + language, text, fence]


class _FrontMatterDumper(yaml.SafeDumper):
    """``yaml.safe_dump``'s YAML with every string on one line: a string with line breaks double-quoted (``\\n``),
    none folded, so that no value spreads over lines and none can end the front matter early."""


_FrontMatterDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style='"' if any(c in text for c in "\r\n") else None))


def front_matter(metadata: dict) -> str:
    """The card's YAML metadata block between its ``---`` lines (``_FrontMatterDumper``)."""
    return yaml.dump(metadata, Dumper=_FrontMatterDumper, sort_keys=False, width=math.inf).strip()


def model_card_text(pipe: ConditionalDiffusionPipeline, record: TrainingRecord, metrics: dict[str, tuple[int, float]],
                    code: list[str]) -> str:
    """The card's Markdown (YAML front matter first); ``code``: the files the folder ships (``shipped_code``)."""
    cfg = record.config
    unet = pipe.unet.config
    dataset = dataset_id(cfg.data.dataset)
    metadata = {"library_name": "diffusers", "pipeline_tag": PIPELINE_TAG, "license": LICENSE,
                "tags": list(TAGS), "datasets": [dataset]}
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    lines = [
        "---", front_matter(metadata), "---", "",
        f"# Class-conditional DDPM on {markdown_text(dataset)}", "",
        f"A class-conditional denoising diffusion model ({params:.2f} M-parameter U-Net with class embeddings, "
        f"{cfg.diffusion.prediction_type} objective, {cfg.diffusion.schedule} schedule, classifier-free guidance) "
        f"generating {unet.sample_size}x{unet.sample_size} images of {unet.num_classes} classes: "
        f"{', '.join(markdown_text(name) for name in pipe.class_names)}.", "",
        f"![samples]({GRID_FILE})", "",
        f"One row per class, {GRID_PER_CLASS} samples each: {cfg.sample.sampler}, {cfg.sample.num_inference_steps} steps, "
        f"{cfg.sample.guidance_text()}, seed {cfg.train.seed}.", "",
        "## Use it", "",
        code_sentence(code), "",
        *fenced(loading_snippet(pipe, cfg.sample), "python"), "",
        "`class_labels` takes class indices or names; `output_type` is `pil`, `np`, `pt` or `latent`. With this project "
        "installed, `pipeline.ConditionalDiffusionPipeline.from_pretrained(folder)` opens it without `trust_remote_code`, "
        "and `python -m pipeline.demo --pipeline folder` serves a web demo.", "",
        "## Training", "",
        f"- Data set: {code_span(cfg.data.dataset)} (split {code_span(cfg.data.split)}"
        + (f", first {cfg.data.max_samples} images" if cfg.data.max_samples else "") + ")",
        f"- Steps: {record.step} optimizer steps, {record.images_seen} images seen (global batch {cfg.train.batch_size})",
        f"- Command: {code_span(record.command)}" if record.command else "- Command: not recorded (exported after the run)",
        "", "Resolved config (the run's `config.yaml`; `python pipeline/train.py --config config.yaml` repeats the run):", "",
        *fenced(cfg.to_yaml().strip(), "yaml"), "",
        "## Evaluation", "",
    ]
    if metrics:
        lines += ["Last in-training metrics (small N, EMA weights):", "", "| metric | value | step |", "|---|---|---|"]
        lines += [f"| {tag} | {value:.4g} | {step} |" for tag, (step, value) in metrics.items()]
    else:
        lines.append("No in-training evaluation was logged (`train.eval_every` was off).")
    return "\n".join(lines) + "\n"

