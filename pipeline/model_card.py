"""The model card of an export: ``README.md`` in the style of diffusers' training examples (``save_model_card``)
and the sample grid it shows (``samples.png``), written beside ``model_index.json``.

The card has hub metadata (the data set by its hub id, a local copy recognised by ``data_source``), the shipped code,
the loading snippet, the data set, steps, command and how the shipped config repeats the run (in chunks where
``train.max_minutes`` cut it), the config, the last in-training metrics and a published copy's measured ones (each
with its N, reference set and, measured, the exact ``evaluate`` command), and the licenses of weights and data.
``training.json`` keeps the record (``TrainingRecord.to_json``), so ``pipeline.export --rewrite-card`` rewrites a card
from its folder. Names from the data or the user are escaped (``markdown_text``, ``code_span``, ``fenced``,
``front_matter``): a class named ``<script>`` or ``[x](http://...)`` is shown as written, never rendered.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import Config, DataConfig, SampleConfig, decode
from pipeline.markdown import code_span, fenced, front_matter, markdown_text
from pipeline.names import HUB_DATASETS, HubDataset
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.sample_flags import SAMPLE_FLAGS
from pipeline.student_card import distillation_lines

GRID_FILE = "samples.png"
FIGURE_FILE = "curve.png"  # a published card's figure of quality against training (``export --figure``)
GRID_PER_CLASS = 8
# No `pipeline_tag`: it must be one of the hub's tasks, and none is a generator conditioned on a class label
# (`unconditional-image-generation` claims no conditioning, `text-to-image` a prompt); the hub's class-conditional
# DiT cards (facebook/DiT-XL-2-256) carry none either, and the hub shows `diffusers:<pipeline class>` from model_index.
LICENSE = "apache-2.0"  # the project's (LICENSE, setup.py): the weights and the shipped code are released under it
LICENSE_NAME = "Apache License 2.0"
TAGS = ("diffusers", "diffusers-training", "class-conditional", "image-generation", "ddpm", "classifier-free-guidance")
CODE_SENTENCE_START = "With only `torch` and `diffusers` installed (the folder ships its code: "
START_CONFIGS = "configs/start-*.yaml"  # every start's config in a run directory (pipeline.run_dir.save_start_config)
IN_TRAINING_REFERENCE_ROWS = 10_000  # the training's evaluator measures distances against at most this many images


def in_training_reference(data: DataConfig) -> DataConfig:
    """The images the in-training evaluation measures distances against (``training.hooks.make_evaluator``): the
    first ``IN_TRAINING_REFERENCE_ROWS`` (or ``data.max_samples``, if fewer) of the split the run trains on."""
    return dataclasses.replace(data, max_samples=min(data.max_samples or IN_TRAINING_REFERENCE_ROWS, IN_TRAINING_REFERENCE_ROWS))


def launched(config: Config, run_dir: Path) -> tuple[Config, int | None]:
    """(``config`` as the run was launched, how many starts the run directory records; None if it records none).

    A start may carry its own ``train.max_minutes`` (the time left in an allocation or a working session, say): the
    latest start's ``config.yaml`` then holds that leftover, and the first start's may be one too. The copy returned
    takes the ``max_minutes`` most starts were launched with (on a tie, the earliest of them): the chunk length that
    repeats the run; with exact resume the weights do not depend on where the chunks ended."""
    starts = sorted(run_dir.glob(START_CONFIGS))
    config = copy.deepcopy(config)  # the training process's own config is never changed
    limits = [((yaml.safe_load(start.read_text()) or {}).get("train") or {}).get("max_minutes", config.train.max_minutes)
              for start in starts]
    if limits:
        config.train.max_minutes = Counter(limits).most_common(1)[0][0]  # ties keep first-seen order
    return config, len(starts) or None


@dataclass
class TrainingRecord:
    """What a model card says about the training that produced the export."""

    config: Config
    step: int
    images_seen: int
    run_dir: Path
    command: str | None = None  # as launched; None when unknown (an export written after the run)
    starts: int | None = None  # how many times the run was started (chunks, resumes); None when unknown
    eval_sample: SampleConfig | None = None  # the in-training evaluation's sampling, if config.sample was replaced since

    @classmethod
    def of_run(cls, run_dir: Path, config: Config) -> TrainingRecord:
        """A finished run's record from its ``status.json`` (the step; images seen = step x global batch) and its
        start configs (``launched``)."""
        status = run_dir / "status.json"
        step = json.loads(status.read_text())["step"] if status.is_file() else 0
        config, starts = launched(config, run_dir)
        return cls(config=config, step=step, images_seen=step * config.train.batch_size, run_dir=run_dir, starts=starts,
                   eval_sample=copy.deepcopy(config.sample))

    @classmethod
    def of_this_process(cls, config: Config, step: int, images_seen: int) -> TrainingRecord:
        """The record of the training running in this process (its command line from ``sys.orig_argv``)."""
        config, starts = launched(config, Path(config.train.output_dir))
        return cls(config=config, step=step, images_seen=images_seen, run_dir=Path(config.train.output_dir),
                   command=shlex.join(sys.orig_argv), starts=starts, eval_sample=copy.deepcopy(config.sample))

    def to_json(self, metrics: dict[str, tuple[int, float]]) -> dict:
        """What an export's ``training.json`` keeps of the record and the last in-training ``metrics``: with the
        folder's ``config.yaml``, enough to write its card again (``pipeline.export.saved_record``)."""
        return {"step": self.step, "images_seen": self.images_seen, "command": self.command, "starts": self.starts,
                "eval_sample": dataclasses.asdict(self.eval_sample or self.config.sample),
                "eval_metrics": {tag: [step, value] for tag, (step, value) in metrics.items()}}



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


@dataclass(frozen=True)
class DataSource:
    """A run's data set as a card names it: ``hub_id`` (None for a local data set the project does not know), the
    local path it was read from (None for a hub id), and the registry's entry (``names.HUB_DATASETS``) if known."""

    hub_id: str | None
    local: str | None
    known: HubDataset | None

    @property
    def name(self) -> str:
        return self.hub_id or Path(str(self.local)).name

    def images(self, split: str, first: int | None) -> str:
        """``split``'s images (``first`` of them; None: all) in words, counted where the registry knows the split."""
        rows = self.known.rows.get(split) if self.known else None
        if first is not None and (rows is None or first < rows):
            return f"the first {first:,} images of the `{split}` split"
        return f"all {rows:,} images of the `{split}` split" if rows else f"all images of the `{split}` split"


def data_source(dataset: str, class_names: list[str]) -> DataSource:
    """``data.dataset`` as a card names it. A local path (absolute, ``./``/``../``, or existing as
    ``pipeline.data.resolve_dataset_path`` finds it) is a copy of the hub data set ``names.HUB_DATASETS`` lists under
    its folder's name when the model's classes are that data set's, else an unknown local data set; anything else is
    a hub id, canonical where the registry knows it (``mnist`` -> ``ylecun/mnist``)."""
    from pipeline.data import resolve_dataset_path

    if not (Path(dataset).is_absolute() or dataset.startswith(".") or Path(resolve_dataset_path(dataset)).exists()):
        known = HUB_DATASETS.get(dataset) or next((entry for entry in HUB_DATASETS.values() if entry.hub_id == dataset), None)
        return DataSource(known.hub_id if known else dataset, None, known)
    known = HUB_DATASETS.get(Path(dataset).name)
    if known is not None and tuple(class_names) == known.class_names:
        return DataSource(known.hub_id, dataset, known)
    return DataSource(None, dataset, None)


def evaluation_command(result: dict) -> tuple[str, bool]:
    """(the ``python -m pipeline.evaluation evaluate`` command with every flag that measured the ``evaluate --out`` JSON
    ``result``: the data set and sampling as resolved, so that no config changes it, the rest as given (``arguments``);
    whether it was rebuilt from the recorded settings instead, with the others unset, for a file without ``arguments``)."""
    if result.get("arguments"):
        given = {key: value for key, value in result["arguments"].items() if key != "command"}
    else:
        reference = result["reference"]
        real = [row["name"].removeprefix("real ").removesuffix(" set") for row in result["rows"] if row["name"].startswith("real ")]
        given = {"pipeline": result.get("pipeline"), "dataset": None, "per_class": result["per_class"],
                 **dict.fromkeys(SAMPLE_FLAGS.values()), "metrics": ",".join(result["metrics"]),
                 "ref_split": reference["split"], "ref_samples": reference["max_samples"] or "all",
                 "real_split": real[0] if real else None, "no_baselines": not real, "seed": result["seed"], "out": "metrics.json"}
    sample = decode(SampleConfig, result["sample"])
    given |= {"dataset": given.get("dataset") or result["dataset"]} | {field: getattr(sample, field) for field in SAMPLE_FLAGS.values()}
    flags = {field: flag for flag, field in SAMPLE_FLAGS.items()}
    words = ["python", "-m", "pipeline.evaluation", "evaluate"]
    for dest, value in given.items():
        flag = flags.get(dest, "--" + dest.replace("_", "-"))  # argparse's dest of --per-class is per_class
        if value is True:
            words.append(flag)
        elif value is not None and value is not False:
            pair = isinstance(value, list | tuple)  # the guidance interval, as LO,HI; a float as its repr (3.0, inf)
            words += [flag, ",".join(repr(float(x)) for x in value) if pair else repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(words), not result.get("arguments")


def measured_section(result: dict, class_names: list[str]) -> str:
    """The card's ``## Measured`` section: what the ``evaluate --out`` JSON ``result`` measured (N, the reference
    set, the hardware), the command that measured it, and its table."""
    from pipeline.evaluation.metrics import markdown_table

    sample = decode(SampleConfig, result["sample"])
    reference = result["reference"]
    source = data_source(result["dataset"], class_names)
    sizes = {row["name"]: row["n"] for row in result["rows"] if "n" in row}
    n = f"N = {sizes['model']:,} samples" if "model" in sizes else "Samples"
    command, rebuilt = evaluation_command(result)
    return "\n".join([
        "## Measured", "",
        f"{n} ({result['per_class']} per class; {sample.sampler}, {sample.num_inference_steps} steps, {sample.guidance_text()}, "
        f"seed {result['seed']})" + (f" of {code_span(result['pipeline'])}" if result.get("pipeline") else "")
        + f"; reference set (for the distances): {source.images(reference['split'], reference['max_samples'])}; "
        f"{markdown_text(result.get('hardware', 'hardware not recorded'))}. `metrics.json` has every number. Measured by"
        + (" (rebuilt from the settings in `metrics.json`, which predates recorded command lines; the flags it does not "
           "record, such as `--batch-size` and `--mixed-precision`, at their defaults)" if rebuilt else "") + ":", "",
        *fenced(command, "bash"), "",
        markdown_table(result["rows"]).rstrip("\n"),
    ])


def last_metrics(run_dir: Path) -> dict[str, tuple[int, float]]:
    """The last value of every ``eval/*`` scalar in the run's TensorBoard logs: tag -> (step, value)."""
    from pipeline.tensorboard_logs import scalar_points

    points = scalar_points(run_dir / "tensorboard") if (run_dir / "tensorboard").is_dir() else {}
    return {tag: (step := max(series), series[step]) for tag, series in sorted(points.items()) if tag.startswith("eval/")}


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
    default = "the folder's own" if type(pipe.scheduler).__name__ == scheduler_name else "the default is 1000-step DDPM"
    return "\n".join([
        "import torch",
        f"from diffusers import DiffusionPipeline, {scheduler_name}",
        "",
        'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        f"{scheduler_line}  # {default}",
        f"images = pipe(class_labels={pipe.class_names[:2]!r}, num_images_per_label=4, guidance_scale={sample.guidance_scale}, "
        f"num_inference_steps={sample.num_inference_steps}{guidance_arguments(sample)}, generator=torch.manual_seed(0)).images",
    ])


def repeat_lines(record: TrainingRecord) -> list[str]:
    """How the shipped ``config.yaml`` repeats the run: one command, or, where ``train.max_minutes`` stops each start
    (exit 75, a checkpoint) or the run was resumed, the first start's command and the chunk command."""
    cfg, starts = record.config, record.starts
    if cfg.train.max_minutes is None and not (starts and starts > 1):
        return ["Resolved config (the run's `config.yaml`; `python pipeline/train.py --config config.yaml` repeats the run):"]
    took = f"The run took {starts} start{'s' if starts > 1 else ''}. " if starts else ""
    how = (f"Training runs in chunks: each start stops after `train.max_minutes` ({cfg.train.max_minutes:g} minutes) with a "
           "checkpoint and exit status 75, and the next start continues it with `--resume latest`" if cfg.train.max_minutes
           else "The run was interrupted and continued with `--resume latest`")
    return [
        f"{how}; resume is exact, so the weights do not depend on where the chunks ended. {took}To repeat the run with the "
        "resolved config below (the run's `config.yaml`, as launched), run the first command once and then the chunk "
        "command until it exits 0:", "",
        *fenced("python pipeline/train.py --config config.yaml\n"
                "python pipeline/train.py --config config.yaml --resume latest  # each further chunk", "bash"), "",
        "Resolved config:",
    ]


def evaluation_lines(record: TrainingRecord, metrics: dict[str, tuple[int, float]], source: DataSource, classes: int) -> list[str]:
    """The card's in-training evaluation table with its N (``train.eval_per_class`` per class), sampling and reference
    set (``in_training_reference``), or why there is none."""
    cfg = record.config
    if not metrics:
        return ["The in-training evaluation (`train.eval_every`) was not recorded with this export." if cfg.train.eval_every
                else "No in-training evaluation was logged (`train.eval_every` was off)."]
    sample = record.eval_sample or cfg.sample
    reference = in_training_reference(cfg.data)
    return [
        f"Last in-training metrics of the EMA weights: N = {cfg.train.eval_per_class * classes:,} samples "
        f"({cfg.train.eval_per_class} per class; {sample.sampler}, {sample.num_inference_steps} steps, {sample.guidance_text()}, "
        f"seed {cfg.train.seed}); reference set (for the distances): {source.images(reference.split, reference.max_samples)}. "
        "At so small an N, FID reads far above its value for thousands of samples: these show the trend.", "",
        "| metric | value | step |", "|---|---|---|",
        *(f"| {tag} | {value:.4g} | {step} |" for tag, (step, value) in metrics.items()),
    ]


def shown_config(cfg: Config) -> str:
    """The run's config as the card shows it: ``config.yaml``'s sections, less ``distill`` for a model that is no student."""
    sections = yaml.safe_load(cfg.to_yaml())
    if cfg.distill.teacher is None:
        del sections["distill"]
    return yaml.safe_dump(sections, sort_keys=False).strip()


def model_card_text(pipe: ConditionalDiffusionPipeline, record: TrainingRecord, metrics: dict[str, tuple[int, float]],
                    code: list[str], measured: dict | None = None, figure: bool = False) -> str:
    """The card's Markdown (YAML front matter first); ``code``: the files the folder ships (``shipped_code``);
    ``measured``: an ``evaluate --out`` JSON, shown as ``measured_section``; ``figure``: the folder ships
    ``FIGURE_FILE``, shown with the evaluation."""
    cfg = record.config
    unet = pipe.unet.config
    source = data_source(cfg.data.dataset, pipe.class_names)
    metadata = {"library_name": "diffusers", "license": LICENSE, "tags": list(TAGS)}
    if source.hub_id is not None:  # the hub's metadata names hub data sets only
        metadata["datasets"] = [source.hub_id]
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    split = source.images(cfg.data.split, cfg.data.max_samples)
    lines = [
        "---", front_matter(metadata), "---", "",
        f"# Class-conditional DDPM on {markdown_text(source.name)}", "",
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
        f"- Data set: {code_span(source.hub_id)} on the Hugging Face hub, {split}" + (
            f"; trained from a local copy at {code_span(source.local)} (without it, add "
            f"{code_span('--data.dataset ' + source.hub_id)} to the commands below)" if source.local else "")
        if source.hub_id else f"- Data set: the local data set {code_span(str(source.local))}, {split}",
        f"- Steps: {record.step} optimizer steps, {record.images_seen} images seen (global batch {cfg.train.batch_size})",
        f"- Command: {code_span(record.command)}" if record.command else "- Command: not recorded (exported after the run)",
        "", *repeat_lines(record), "",
        *fenced(shown_config(cfg), "yaml"), "",
        *([*distillation_lines(cfg, record.step, record.run_dir), ""] if cfg.distill.teacher else []),
        "## Evaluation", "",
        *evaluation_lines(record, metrics, source, unet.num_classes),
        *(["", f"![quality against training time and images seen]({FIGURE_FILE})"] if figure else []),
    ]
    if measured is not None:
        lines += ["", measured_section(measured, pipe.class_names)]
    data = (f"The training data, {code_span(source.hub_id)}: {source.known.license}." if source.known else
            f"The training data ({code_span(source.name)}) comes with its own terms, which this card does not record.")
    lines += ["", "## License", "", f"The weights and the code in this folder: {LICENSE_NAME} (`{LICENSE}`), this project's "
              "license.", "", data]
    return "\n".join(lines) + "\n"
