"""The sampling settings a command line or the demo page gives on top of a run's: one decoder, one set of flags.

>>> settings = sample_settings(run.sample, guidance_scale="3", guidance_interval="0.3,5.0")   # the rest stays the run's

``python -m pipeline.evaluation evaluate`` and ``python -m pipeline.figures`` take ``--sampler``, ``--steps``,
``--guidance``, ``--guidance-interval`` and ``--guidance-ramp`` (``add_sample_flags``, ``flagged_settings``), the
demo its page's fields (``sample_settings``); every value is decoded as the config's own are (``0.3,5.0``, ``[0.3,
5.0]`` or ``none`` for the interval) and checked by the one guidance rule before any model is loaded. The commands
that score samples (evaluate, bench/sampling.py, bench/diffusers_recipe.py) take ``--metrics``, ``--ref-split`` and
``--ref-samples`` (``add_score_flags``, ``score_reference``). The command lines' numeric flags (the study's too) are
checked by ``check_positive``, and every ``--pipeline`` (evaluate, figures, the demo, bench/sampling.py) by
``pipeline_location``. Torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, SampleConfig, decode
from pipeline.errors import ConfigError
from pipeline.guidance import GUIDANCE_RAMPS, check_guidance_settings
from pipeline.names import METRICS, SAMPLER_NAMES

# command-line flag -> the SampleConfig field it sets (and the argparse dest it is stored under)
SAMPLE_FLAGS = {
    "--sampler": "sampler",
    "--steps": "num_inference_steps",
    "--guidance": "guidance_scale",
    "--guidance-interval": "guidance_interval",
    "--guidance-ramp": "guidance_ramp",
}


def sample_settings(base: SampleConfig, **given: Any) -> SampleConfig:
    """``base`` (a run's ``sample`` section) with the ``given`` fields that are not None, decoded through
    ``pipeline.config.decode`` like a config's values, then checked: ConfigError naming the field if a value is
    malformed, the steps fewer than 1, or the guidance settings break ``guidance.check_guidance_settings``. Whether
    a model can be guided at all is the pipeline's check (``ConditionalDiffusionPipeline.check_guidance``)."""
    settings = decode(SampleConfig, dataclasses.asdict(base) | {key: value for key, value in given.items() if value is not None})
    if settings.num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {settings.num_inference_steps}")
    try:
        check_guidance_settings(settings.guidance_scale, settings.guidance_interval, settings.guidance_ramp)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return settings


def add_sample_flags(parser: argparse.ArgumentParser) -> None:
    """Add the ``SAMPLE_FLAGS`` to ``parser``, each stored under its field's name and defaulting to the run's
    ``sample`` section (``flagged_settings``)."""
    options: dict[str, dict[str, Any]] = {
        "--sampler": {"metavar": "SAMPLER", "help": ", ".join(SAMPLER_NAMES)},
        "--steps": {"metavar": "STEPS", "type": int, "help": "denoising steps"},
        "--guidance": {"metavar": "SCALE", "type": float, "help": "classifier-free guidance scale, 1 = none"},
        "--guidance-interval": {"metavar": "LO,HI", "help": "guide only steps whose noise level sigma_t is in (LO, HI], "
                                                            "e.g. 0.3,5.0 or 0.3,inf; none = every step"},
        "--guidance-ramp": {"metavar": "RAMP", "help": f"{', '.join(GUIDANCE_RAMPS)}: guidance weight over the steps, "
                                                        "averaging the scale"},
    }
    for flag, field in SAMPLE_FLAGS.items():
        option = options[flag]
        parser.add_argument(flag, dest=field, **option | {"help": f"{option['help']} (default: the run's sample.{field})"})


def flagged_settings(base: SampleConfig, args: argparse.Namespace) -> SampleConfig:
    """``base`` with the sampling flags given on the command line (``add_sample_flags``), by ``sample_settings``."""
    return sample_settings(base, **{field: getattr(args, field) for field in SAMPLE_FLAGS.values()})


def add_score_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--metrics``, ``--ref-split`` and ``--ref-samples``: which scores, measured against which real images
    (``score_reference``)."""
    described = "; ".join(f"{name}: {metric.help}" for name, metric in METRICS.items())
    parser.add_argument("--metrics", default="accuracy,cfid",
                        help=f"comma list of {', '.join(METRICS)} (default accuracy,cfid). {described}")
    parser.add_argument("--ref-split", default="train", help="split the distances are measured against (default train)")
    parser.add_argument("--ref-samples", default="10000", help="first N rows of the reference split, or 'all' (default 10000)")


def score_reference(args: argparse.Namespace, dataset: str) -> DataConfig:
    """The reference images ``add_score_flags``' flags name in ``dataset``; ConfigError unless ``--ref-samples`` is a
    row count >= 1 or ``all``."""
    if args.ref_samples != "all" and (not args.ref_samples.isdigit() or int(args.ref_samples) < 1):
        raise ConfigError(f"--ref-samples must be a row count >= 1 or 'all', got {args.ref_samples!r}")
    return DataConfig(dataset=dataset, split=args.ref_split, max_samples=None if args.ref_samples == "all" else int(args.ref_samples))


def check_positive(flags: dict[str, float | None]) -> None:
    """ConfigError for a numeric command-line flag (name -> value, None where not given) given at or below 0, which is
    never "the default": counts (ints) must be >= 1, rates and durations (floats) > 0."""
    for flag, value in flags.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be {'>= 1' if isinstance(value, int) else '> 0'}, got {value}")


def pipeline_location(text: str) -> str:
    """``--pipeline``'s value, checked before anything loads: a folder holding an export (``model_index.json``), or a
    hub id for ``from_pretrained``. A hub id is ``owner/name`` in the hub's characters (its own ``validate_repo_id``)
    where ``owner`` is no folder here; anything else (absolute, ``./``, ``../``, ``~``, a bare name, two or more
    ``/``, a path under a local folder) is a path: ConfigError, one line, naming the fix, if there is no such folder
    or it holds no export."""
    path = Path(text).expanduser()
    fix = "pass a training run's pipeline/ folder (e.g. runs/quickstart/pipeline) or a hub id owner/name"
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return text
        inside = path / "pipeline"
        fix = f"did you mean {inside}?" if (inside / "model_index.json").is_file() else fix
        raise ConfigError(f"--pipeline {text} is not an exported pipeline (no model_index.json); {fix}")
    if not path.exists() and is_hub_id(text):
        return text
    raise ConfigError(f"--pipeline: no such folder: {text}; {fix}")


def run_config_file(pipeline_dir: str | Path) -> Path | None:
    """The ``config.yaml`` of the pipeline folder ``pipeline_dir``: inside it (a published pipeline) or beside it (a
    training run's ``pipeline/``); None if there is neither."""
    return next((path for path in (Path(pipeline_dir) / "config.yaml", Path(pipeline_dir).parent / "config.yaml")
                 if path.is_file()), None)


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub id rather than a local path: ``owner/name``, both parts as the hub allows
    them, ``owner`` not a folder in the working directory (``runs/x`` is a path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # torch-free, the hub's own rule

    owner, slash, _ = text.partition("/")
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return bool(slash) and not Path(owner).is_dir()
