"""The lists of names that the config, the command lines, the study and the heavy modules share, torch-free.

Each list is written here once; the config's choices, ``--help`` texts, "did you mean" messages, study tables and
checks read it from here, and the modules that implement the names (``pipeline.diffusion``, the U-Net,
``pipeline.evaluation.metrics``) are pinned to it by tests. Importing this module loads only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The MNIST copy committed in the repository: the default data set, so the main job needs no hub access.
EMBEDDED_MNIST = "data/mnist"

# Inference schedulers, by the name a config, `evaluate --sampler` and the demo take (pipeline.diffusion.SAMPLERS
# maps each to its diffusers class). `lcm` (LCMScheduler) samples consistency-distilled students.
SAMPLER_NAMES = ("ddpm", "ddim", "dpmsolver++", "unipc", "euler", "euler_a", "lcm")

# Few-step distillation (`distill.method`, pipeline.distillation), each method with the sampler of its students:
# consistency students sample with LCM's multistep sampler at any step count, segment students with DDIM on the grid
# of `sample.num_inference_steps` steps they were trained for.
DISTILL_METHODS = {"consistency": "lcm", "segment": "ddim"}

# (sampler, schedule, prediction type) that pipeline.sampler_checks.check_sampler refuses (docs/samplers.md), so that
# a run is refused at start rather than at its first sample grid; tests/test_schedulers.py builds every combination
# with make_sampler and checks that exactly these raise.
REFUSED_SAMPLERS = {
    ("euler", "cosine", "epsilon"): "its first step multiplies the epsilon error by sigma_max ~2e4",
    ("euler_a", "cosine", "epsilon"): "it returns NaN at some step counts (diffusers #14213)",
    ("euler_a", "cosine", "v_prediction"): "it returns NaN at some step counts (diffusers #14213)",
}

# Sampling precision: bf16 autocast where the hardware runs it natively ("auto"), never ("no") or always ("bf16").
SAMPLING_PRECISIONS = ("auto", "no", "bf16")

# How the class embedding c meets the features h and the time embedding t in a residual block. The U-Net's file is
# shipped alone in every export (diffusers loads a component from one file), so it keeps its own copy of this tuple
# and of `conditioning_problem`; tests/test_model.py pins both to these.
CONDITIONING_MODES = ("multiply", "add", "scale_shift")
AFTER_NORM_MODES = ("multiply", "add")  # the modes that model.embed_after_norm may move after the GroupNorm


def conditioning_problem(conditioning: str, embed_after_norm: bool) -> str | None:
    """Why the U-Net cannot be built with this conditioning, or None."""
    if conditioning not in CONDITIONING_MODES:
        return f"conditioning {conditioning!r} unknown; use {', '.join(CONDITIONING_MODES)}"
    if embed_after_norm and conditioning not in AFTER_NORM_MODES:
        return (f"embed_after_norm applies to {' and '.join(AFTER_NORM_MODES)} conditioning; {conditioning} is always "
                "after the norm (set it false)")
    return None


Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class Metric:
    """One metric of ``pipeline.evaluation``: its name (``--metrics``, ``train.eval_metrics``), help text, the result
    columns it fills with whether higher or lower is better (evaluation tables, the study's comparisons), whether
    training may log it (``eval/<column>``), and ``compute``: the ``module:function`` that scores it, imported when
    a sample set is scored (``pipeline.evaluation.metrics``)."""

    name: str
    help: str
    columns: dict[str, Direction]
    compute: str
    in_training: bool = True


METRICS = {metric.name: metric for metric in (
    Metric("accuracy", "share of samples the project classifier assigns to their conditioning class (also class_is)",
           {"accuracy": "higher", "class_is": "higher"}, "pipeline.evaluation.metrics:score_accuracy"),
    Metric("cfid", "Fréchet distance on the project classifier's penultimate features (vs the reference split)",
           {"cfid": "lower"}, "pipeline.evaluation.metrics:score_cfid"),
    Metric("fid", "FID on TF-Inception pool_3 features (vs the reference split)",
           {"fid": "lower"}, "pipeline.evaluation.metrics:score_fid"),
    Metric("is", "ImageNet Inception Score (needs torch-fidelity and its downloaded weights)",
           {"is": "higher"}, "pipeline.evaluation.metrics:score_is", in_training=False),
)}
COLUMNS: dict[str, Direction] = {column: way for metric in METRICS.values() for column, way in metric.columns.items()}
TRAINING_METRICS = tuple(name for name, metric in METRICS.items() if metric.in_training)


@dataclass(frozen=True)
class HubDataset:
    """A data set of the Hugging Face hub that this project trains on: its hub id, its class names and split sizes
    (the ``ClassLabel`` and rows of the hub's copy and of the local Parquet copies, ``../shared/data/README.md``), and
    its terms of use as a model card states them. ``pipeline.model_card.data_source`` names a local copy by its hub
    id when the folder is named like a key of ``HUB_DATASETS`` and the model's class names are this data set's."""

    hub_id: str
    class_names: tuple[str, ...]
    rows: dict[str, int]  # split -> images
    license: str


# Keyed by the folder name of a local copy (../shared/data/mnist, ../shared/data/cifar10, the embedded data/mnist) and
# the hub's short alias; the model cards' `datasets:` metadata and data set licenses come from here.
HUB_DATASETS = {
    "mnist": HubDataset(
        "ylecun/mnist", tuple("0123456789"), {"train": 60_000, "test": 10_000},
        "CC BY-SA 3.0: Yann LeCun and Corinna Cortes, who hold the copyright of this derivative of NIST's data, release "
        "it under the Creative Commons Attribution-Share Alike 3.0 license (the hub card's metadata field reads `mit`)"),
    "cifar10": HubDataset(
        "uoft-cs/cifar10", ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        {"train": 50_000, "test": 10_000},
        "no formal license (`unknown` on the hub); its authors (Alex Krizhevsky, Vinod Nair and Geoffrey Hinton) publish "
        "it for research and ask that Krizhevsky's 2009 report \"Learning Multiple Layers of Features from Tiny Images\" "
        "be cited"),
}
