"""One typed configuration shared by training, evaluation, figures, the study runner and benchmarks.

A run is described by a YAML file with the sections below, then overridden on the command line with
``--section.key value`` (lists as ``1,2,2`` or ``"[1, 2, 2]"``; booleans as ``true``/``false``; ``none`` for
unset). Unknown keys and ill-typed or out-of-range values fail at start with a message naming the key and the
closest valid ones. ``python pipeline/train.py --help`` prints every option with its default and meaning.

This module owns the sections (dataclasses), their range checks (``validate``), ``load_config`` and ``--help``;
``pipeline.config_decoding`` turns raw YAML and command-line values into typed ones. The lists of choices come
from ``pipeline.names`` and the guidance rule from ``pipeline.guidance``, so importing this module loads neither
torch nor diffusers: the command-line tools refuse a bad flag before their heavy imports.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import draccus
import yaml
from draccus.utils import DecodingError, ParsingError

from pipeline.config_decoding import close_matches, read_yaml, type_name  # importing it registers the decoders decode() uses
from pipeline.errors import ConfigError
from pipeline.guidance import GUIDANCE_RAMPS, check_guidance_settings
from pipeline.names import (
    CONDITIONING_MODES,
    DISTILL_METHODS,
    EMBEDDED_MNIST,
    METRICS,
    REFUSED_SAMPLERS,
    SAMPLER_NAMES,
    TRAINING_METRICS,
    conditioning_problem,
)

T = TypeVar("T")
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]  # sample.sampler's choices
GuidanceRamp = Literal[GUIDANCE_RAMPS]  # type: ignore[valid-type]  # sample.guidance_ramp's choices
TrainingMetric = Literal[TRAINING_METRICS]  # type: ignore[valid-type]  # train.eval_metrics' choices
DistillMethod = Literal[tuple(DISTILL_METHODS)]  # type: ignore[valid-type]  # distill.method's choices


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A field with its ``--help`` text; tuple defaults get a factory like any other sequence."""
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    """The U-Net's shape. Image channels, size and number of classes come from the data set."""

    base_channels: int = _opt(64, "channels of the first level (the seed uses 64)")
    channel_mult: tuple[int, ...] = _opt((1, 2, 2), "channel multiplier per resolution level")
    layers_per_block: int = _opt(2, "residual blocks per resolution level")
    attention_resolutions: tuple[int, ...] = _opt((7,), "feature-map sizes that get self-attention")
    attention_heads: int = _opt(4, "heads of each self-attention block")
    dropout: float = _opt(0.1, "dropout inside residual blocks")
    conditioning: Literal[CONDITIONING_MODES] = _opt(  # type: ignore[valid-type]
        "multiply", "how the class embedding c meets features h and time t: c*h+t, h+c+t, or AdaGN"
    )
    embed_after_norm: bool = _opt(
        False, "multiply/add mix (t, c) in after the block's second GroupNorm, not before it (where, at one channel per "
        "group, the norm erases t and all of c but its sign)"
    )
    upsample: Literal["transposed", "nearest"] = _opt("transposed", "transposed conv (seed) or nearest+conv")
    learned_variance: bool = _opt(False, "also predict the reverse variance (Improved DDPM hybrid loss)")


@dataclass
class DiffusionConfig:
    """Forward process and training objective."""

    schedule: Literal["linear", "cosine"] = _opt("linear", "beta schedule: DDPM linear or Nichol-Dhariwal cosine")
    num_train_timesteps: int = _opt(1000, "T, the number of diffusion steps")
    prediction_type: Literal["epsilon", "v_prediction"] = _opt("epsilon", "what the network predicts")
    loss_weighting: Literal["none", "min_snr"] = _opt("none", "per-timestep loss weight (min-SNR-gamma)")
    snr_gamma: float = _opt(5.0, "gamma of min-SNR weighting")
    p_uncond: float = _opt(0.1, "probability a label is replaced by the null class (classifier-free guidance)")


@dataclass
class DataConfig:
    """Which images to train on: a Hugging Face hub id or a local path."""

    dataset: str = _opt(EMBEDDED_MNIST, "hub id (ylecun/mnist) or local path (Parquet dir, imagefolder, save_to_disk)")
    split: str = _opt("train", "split to train on")
    image_column: str | None = _opt(None, "image column (default: detected, e.g. image/img)")
    label_column: str | None = _opt(None, "label column (default: detected ClassLabel, e.g. label)")
    max_samples: int | None = _opt(None, "use only the first N rows (quick runs, tests)")
    num_classes: int | None = _opt(
        None, "classes of an integer label column: labels must be in [0, num_classes). none = a ClassLabel's names, else "
        "0..the largest label, refused when fewer than half of those labels occur (a stray label, not that many classes)"
    )
    random_flip: bool = _opt(False, "random horizontal flips (CIFAR-10 yes, digits no)")
    translate: int = _opt(0, "random translation jitter of up to N pixels: pad and random crop back to size (the seed's "
                             "random crops); black border for grayscale, mirrored for colour; 0 = off, < half the image size")
    cutout: int = _opt(0, "side in pixels of one random square blanked per training image (Cutout, DeVries & Taylor "
                          "2017); 0 = off, at most the image size")


@dataclass
class SampleConfig:
    """How samples are drawn for logging, evaluation and figures."""

    sampler: SamplerName = _opt("dpmsolver++", "inference scheduler (docs/samplers.md lists what works with what)")
    num_inference_steps: int = _opt(20, "denoising steps")
    guidance_scale: float = _opt(2.0, "classifier-free guidance scale (1.0 = none)")
    guidance_interval: tuple[float, float] | None = _opt(
        None, "guide only steps whose noise level sigma_t = sqrt((1-alpha_bar)/alpha_bar) is in (lo, hi], e.g. 0.3,5.0 "
        "or 0.3,inf; the others run the conditional model alone (Kynkaanniemi et al. 2024; none = every step)"
    )
    guidance_ramp: GuidanceRamp = _opt(
        "constant", "guidance weight over the steps: s at each, or rising (1 -> 2s-1) or falling (2s-1 -> 1) linearly, averaging s"
    )

    def guidance_text(self, compact: bool = False) -> str:
        """The guidance, with the ramp and interval where they are not the defaults: for cards and figures
        ``guidance scale 3.0, increasing ramp, only at noise levels sigma in (0.3, 5]``, ``compact`` for table cells
        ``s=3, increasing ramp, sigma in (0.3, 5]``."""
        parts = [f"s={self.guidance_scale:g}" if compact else f"guidance scale {self.guidance_scale}"]
        if self.guidance_ramp != "constant":
            parts.append(f"{self.guidance_ramp} ramp")
        if self.guidance_interval is not None:
            where = "sigma in ({:g}, {:g}]" if compact else "only at noise levels sigma in ({:g}, {:g}]"
            parts.append(where.format(*self.guidance_interval))
        return ", ".join(parts)


@dataclass
class TrainConfig:
    """The optimisation loop, its outputs and stop conditions."""

    output_dir: str = _opt("runs/default", "where checkpoints, tensorboard/ and pipeline/ go")
    seed: int = _opt(0, "seed of initialisation, data order, noise and dropout")
    batch_size: int = _opt(128, "GLOBAL batch (split over processes and accumulation steps)")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-4, "peak learning rate (for the global batch; not rescaled by process count)")
    lr_schedule: Literal["constant", "cosine", "linear"] = _opt("constant", "shape after warmup")
    warmup_steps: int = _opt(0, "linear warmup steps")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float | None = _opt(1.0, "gradient clipping norm, > 0 (none = off)")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps")
    max_epochs: int | None = _opt(None, "stop after this many epochs")
    max_minutes: float | None = _opt(None, "stop (with a checkpoint, exit 75) after this wall time")
    mixed_precision: Literal["no", "bf16"] = _opt("no", "bf16 autocast with fp32 master weights and EMA")
    ema_decay: float = _opt(0.9999, "EMA decay ceiling")
    ema_warmup: bool = _opt(True, "EMA warmup (decay grows as 1-(1+step)^-power)")
    ema_power: float = _opt(0.75, "EMA warmup power (2/3 for long runs, 3/4 for short)")
    log_every: int = _opt(50, "steps between loss/lr/throughput logs")
    sample_every: int | None = _opt(1000, "steps between EMA sample grids in TensorBoard (none = off)")
    eval_every: int | None = _opt(None, "steps between small-N metrics (accuracy, classifier FID) in TensorBoard (none = off)")
    eval_metrics: tuple[TrainingMetric, ...] = _opt(
        ("accuracy", "cfid"), "metrics logged every eval_every steps: "
        + "; ".join(f"{name}: {METRICS[name].help}" for name in TRAINING_METRICS)
    )
    eval_per_class: int = _opt(10, "samples per class for those metrics (small on a CPU; FID wants >= 500 per class for absolute values)")
    checkpoint_every: int | None = _opt(1000, "steps between checkpoints (one is always written at exit)")
    keep_checkpoints: int = _opt(3, "how many recent checkpoints to keep")
    export_every: int | None = _opt(None, "steps between pipeline exports (one is always written at the end)")
    compile: bool = _opt(False, "torch.compile the U-Net")
    channels_last: bool = _opt(False, "channels_last memory format")
    overwrite: bool = _opt(False, "start over where checkpoints exist (the old run is moved to abandoned/, not deleted)")


@dataclass
class DistillConfig:
    """Few-step distillation of a trained pipeline (``python -m pipeline.distill``, docs/samplers.md): a student that
    takes the guidance scale as an input and samples in a few steps, one U-Net evaluation each."""

    teacher: str | None = _opt(None, "the trained pipeline folder to distil (none: ordinary training); the student starts from it")
    method: DistillMethod = _opt("segment", "segment: progressive distillation onto the ddim grid of sample.num_inference_steps "
                                            "(docs/samplers.md); consistency: LCM-style, sampled by lcm at any step count")
    guidance_range: tuple[float, float] = _opt((1.0, 5.0), "guidance scales the student learns, drawn uniformly per image (lo, hi)")
    embedding_lr_scale: float = _opt(1.0, "learning rate of the zero-initialised guidance embedding, as a multiple of train.lr")
    teacher_steps: int = _opt(20, "the teacher's guided grid from T to 0: consistency distils one DDIM step of it, segment "
                                  "solves a student step with teacher_steps / sample.num_inference_steps of them")


@dataclass
class Config:
    """A run: one section per dataclass above, written ``--section.key`` on the command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        """Sections as nested dicts, values as declared (tuples stay tuples)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The YAML that ``load_config`` reads back to an equal Config (sections and keys in declaration order)."""
        return yaml.safe_dump(draccus.encode(self), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write ``to_yaml()`` to ``path`` (a run's ``config.yaml``, compared on resume)."""
        Path(path).write_text(self.to_yaml())


def decode(cls: type[T], raw: dict[str, Any]) -> T:
    """The dataclass ``cls`` from nested mappings (YAML sections), or a ConfigError naming the key and the fix."""
    _check_keys(cls, raw)
    try:
        return draccus.decode(cls, raw)
    except DecodingError as error:
        raise ConfigError(f"{'.'.join(error.key_path)}: {error.message}" if error.key_path else error.message) from None
    except ParsingError as error:
        raise ConfigError(str(error)) from None


def _check_keys(cls: type, raw: dict[str, Any], prefix: str = "") -> None:
    """Unknown keys with the closest known ones (draccus names only the unknown), sections that are not mappings."""
    hints = typing.get_type_hints(cls)
    kind = "section" if all(dataclasses.is_dataclass(hint) for hint in hints.values()) else "key"
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config {kind} {name!r}; {close_matches(name, [prefix + known for known in hints])}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"section {name!r} must be a mapping of key: value")
            _check_keys(hints[key], value, f"{name}.")


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express."""
    m, d, t, s = cfg.model, cfg.diffusion, cfg.train, cfg.sample
    conditioning = conditioning_problem(m.conditioning, m.embed_after_norm)
    guidance = _guidance_problem(s)
    checks = [
        (m.base_channels >= 4, "model.base_channels must be >= 4"),
        (len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult), "model.channel_mult must be >= 1 each"),
        (m.layers_per_block >= 1, "model.layers_per_block must be >= 1"),
        (m.attention_heads >= 1, "model.attention_heads must be >= 1"),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (conditioning is None, f"model.{conditioning}"),
        (d.num_train_timesteps >= 2, "diffusion.num_train_timesteps must be >= 2"),
        (0.0 <= d.p_uncond < 1.0, "diffusion.p_uncond must be in [0, 1)"),
        (d.snr_gamma > 0, "diffusion.snr_gamma must be > 0"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
        (0 < t.lr < math.inf, "train.lr must be > 0 and finite"),
        (0.0 <= t.adam_beta1 < 1.0 and 0.0 <= t.adam_beta2 < 1.0, "train.adam_beta1 and train.adam_beta2 must be in [0, 1)"),
        (0 <= t.weight_decay < math.inf, "train.weight_decay must be >= 0 and finite"),
        (t.max_grad_norm is None or 0 < t.max_grad_norm < math.inf, "train.max_grad_norm must be > 0 and finite, or none"),
        (0 < t.ema_power < math.inf, "train.ema_power must be > 0 and finite"),
        (t.seed >= 0, "train.seed must be >= 0"),
        (cfg.data.max_samples is None or cfg.data.max_samples >= 1, "data.max_samples must be >= 1 or none"),
        (cfg.data.num_classes is None or cfg.data.num_classes >= 1, "data.num_classes must be >= 1 or none"),
        (cfg.data.translate >= 0, "data.translate must be >= 0 pixels (0 = off)"),
        (cfg.data.cutout >= 0, "data.cutout must be >= 0 pixels (0 = off)"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (0.0 < t.ema_decay < 1.0, "train.ema_decay must be in (0, 1)"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (t.eval_per_class >= 1, "train.eval_per_class must be >= 1"),
        (len(t.eval_metrics) >= 1, f"train.eval_metrics must name at least one of {', '.join(TRAINING_METRICS)}"),
        (t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.max_epochs is None or t.max_epochs >= 1, "train.max_epochs must be >= 1"),
        (t.max_minutes is None or t.max_minutes > 0, "train.max_minutes must be > 0"),
        (s.num_inference_steps >= 1, "sample.num_inference_steps must be >= 1"),
        (guidance is None, f"sample.{guidance}"),
    ]
    if cfg.distill.teacher is not None:
        checks += _distill_checks(cfg.distill, s, d.num_train_timesteps)
    for every in ("sample_every", "eval_every", "checkpoint_every", "export_every"):
        value = getattr(t, every)
        checks.append((value is None or value >= 1, f"train.{every} must be >= 1 or none"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if reason := REFUSED_SAMPLERS.get((s.sampler, d.schedule, d.prediction_type)):
        raise ConfigError(
            f"sample.sampler {s.sampler} is refused with diffusion.schedule {d.schedule} and prediction_type "
            f"{d.prediction_type}: {reason}; use dpmsolver++ (see docs/samplers.md)"
        )
    if t.max_steps is None and t.max_epochs is None and t.max_minutes is None:
        raise ConfigError("no stop condition: set train.max_steps, train.max_epochs or train.max_minutes")
    return cfg


def _distill_checks(distill: DistillConfig, sample: SampleConfig, timesteps: int) -> list[tuple[bool, str]]:
    """A distillation run's checks, as ``validate``'s (ok, message) pairs: what the student learns and samples with."""
    (lo, hi), steps, sampler = distill.guidance_range, sample.num_inference_steps, DISTILL_METHODS[distill.method]
    return [
        (0 <= lo <= hi < math.inf, f"distill.guidance_range must be two finite scales 0 <= lo <= hi, got {lo:g},{hi:g}"),
        (lo <= sample.guidance_scale <= hi, f"sample.guidance_scale {sample.guidance_scale:g} is outside distill.guidance_range "
                                            f"{lo:g},{hi:g}, the scales the student learns"),
        (0 < distill.embedding_lr_scale < math.inf, f"distill.embedding_lr_scale must be > 0, got {distill.embedding_lr_scale:g}"),
        (1 <= distill.teacher_steps <= timesteps, f"distill.teacher_steps must be in 1..diffusion.num_train_timesteps ({timesteps})"),
        (sample.sampler == sampler, f"distill.method {distill.method} samples with sample.sampler {sampler}, not {sample.sampler}"),
        (distill.method != "consistency" or steps <= distill.teacher_steps, f"sample.num_inference_steps {steps} exceeds "
         f"distill.teacher_steps {distill.teacher_steps}: lcm samples on the teacher grid the student learns"),
        (distill.method != "segment" or distill.teacher_steps % max(steps, 1) == 0, f"distill.teacher_steps "
         f"{distill.teacher_steps} must be a multiple of sample.num_inference_steps {steps} (teacher steps per student step)"),
    ]


def _guidance_problem(sample: SampleConfig) -> str | None:
    """Why ``pipeline.guidance`` refuses these guidance settings (its message starts with the field), or None."""
    try:
        check_guidance_settings(sample.guidance_scale, sample.guidance_interval, sample.guidance_ramp)
    except ValueError as error:
        return str(error)
    return None


def config_sections(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's sections (``{"train": {"lr": ...}, ...}``), with those of its ``base:`` file (a path relative
    to the file, itself read so) underneath: a section's keys in the file replace the base's, key by key. ConfigError
    naming the file for a missing file, an unknown section or key, or a ``base`` chain that comes back to itself."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass a YAML file such as configs/mnist.yaml")
    sections = read_yaml(path) or {}
    if not isinstance(sections, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(sections).__name__}")
    base = sections.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base must name another config file, e.g. base: cifar10-cpu.yaml")
        if (path.parent / base).resolve() in (*_including, path.resolve()):
            raise ConfigError(f"{path}: base {base} leads back to {path}; a config cannot be its own base")
        merged = config_sections(path.parent / base, (*_including, path.resolve()))
        for section, keys in sections.items():
            both_mappings = isinstance(keys, dict) and isinstance(merged.get(section), dict)
            merged[section] = {**merged[section], **keys} if both_mappings else keys
        sections = merged
    try:
        _check_keys(Config, sections)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return sections


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build a Config from defaults, then a YAML file (``config_sections``: with its ``base:`` file underneath), then
    overrides.

    Args:
        path: YAML file with any of the sections ``model``, ``diffusion``, ``data``, ``train``, ``sample``, ``distill``,
            and optionally ``base: OTHER.yaml``.
        overrides: ``["--train.lr", "1e-4", "--data.max_samples=512"]`` or ``{"train.lr": 1e-4}``.
    """
    sections = config_sections(path) if path is not None else {}
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for dotted, value in pairs.items():
        if "." not in dotted:
            raise ConfigError(f"override {dotted!r} must be section.key, e.g. train.lr")
        section, key = dotted.split(".", 1)
        sections.setdefault(section, {})[key] = value
    return validate(decode(Config, sections))


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--train.lr", "1e-4", "--data.split=test"]`` -> ``{"train.lr": "1e-4", "data.split": "test"}``."""
    pairs: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.lr 1e-4")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            value = args[i]
        else:
            raise ConfigError(f"override {arg} needs a value, e.g. {arg} 1e-4")
        pairs[name] = value
        i += 1
    return pairs


def options_help() -> str:
    """Every override with its type, default and meaning, for ``--help``."""
    lines = []
    for section, cls in typing.get_type_hints(Config).items():
        lines.append(f"\n{section}: {cls.__doc__.strip()}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            kind = type_name(hints[f.name])
            lines.append(f"  --{section}.{f.name} {kind} (default {shown})\n      {f.metadata['help']}")
    return "\n".join(lines)

