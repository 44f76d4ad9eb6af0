"""Self-contained exports: a ``save_pretrained`` folder that plain diffusers opens, with its code and model card.

The folder carries this project's own modules, copied at export: the pipeline's module
(``pipeline_conditional.py``) with the modules it imports relatively (``sampler_checks.py``, ``guidance.py``), and
the U-Net's module as ``unet/unet.py`` (diffusers' convention for a custom component; the pipeline's module names
the U-Net's class without importing it, so this is the one copy of the U-Net's code). ``model_index.json`` names
them, so that

>>> DiffusionPipeline.from_pretrained("runs/quickstart/pipeline", trust_remote_code=True)

loads with only torch and diffusers installed. Every shipped file is checked to import nothing but the standard
library, torch, diffusers (and numpy and PIL, which diffusers requires) and the files shipped beside it.

Each writer builds its folder in full beside the target and swaps it in (``pipeline.atomic``), so a crash never
leaves a half-written export: ``export_pipeline`` (training, and ``python -m pipeline.export RUN_DIR``, which
rewrites a run's ``pipeline/`` with this checkout's code and a new card), ``publish`` (``--out DIR``: a copy to
commit or share), ``update_code`` (``--update-code DIR``: this checkout's code in an export whose weights, config,
sample grid, metrics and card stay as they are, e.g. the committed ``data/pretrained/`` pipelines) and
``rewrite_card`` (``--rewrite-card DIR``: a published card written again from the folder's own files). Each replaces
only an export or an empty directory (``pipeline.atomic.replace_problem``); any other directory is refused, kept.

An export with a model card also records the optimizer step its weights are from (``training.json``), so that a
resumed run can tell whether ``pipeline/`` holds its final step (``exported_step``).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import shutil
import sys
from pathlib import Path

from diffusers import DiffusionPipeline, SchedulerMixin

from pipeline.atomic import EXPORT_MARKER, rebuilt, replace_problem
from pipeline.config import Config, SampleConfig, decode, load_config
from pipeline.errors import ConfigError
from pipeline.model_card import (
    FIGURE_FILE,
    TrainingRecord,
    last_metrics,
    model_card_text,
    shipped_code,
    with_shipped_code,
    write_model_card,
)
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.sampling import saved_run_config
from pipeline.saving import module_path, relative_imports, write_code

# what a shipped module may import besides the standard library and the files shipped beside it
SHIPPABLE_PACKAGES = frozenset({"torch", "diffusers", "numpy", "PIL"})
TRAINING_FILE = "training.json"  # the step and images seen of the weights an export holds


class ExportError(ValueError):
    """A module that cannot be shipped: it imports something plain diffusers does not provide. A fault of the code
    (this checkout's), not of the command's input, so not a ConfigError: ``main`` lets it through with its traceback."""


def check_target(final: Path, fix: str) -> None:
    """ConfigError, naming ``fix``, unless an export may replace ``final`` (``replace_problem``): nothing is written."""
    if problem := replace_problem(final):
        raise ConfigError(f"{problem}; {fix}")


def exported_step(folder: Path) -> int | None:
    """The optimizer step whose weights the export ``folder`` holds, from its ``training.json``; None when unknown
    (no export there, or one written without a training record or before exports recorded their step)."""
    try:
        return int(json.loads((folder / TRAINING_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_export(pipe: DiffusionPipeline, directory: Path, record: TrainingRecord | None = None) -> None:
    """``pipe.save_pretrained(directory)`` plus the code that opens it in plain diffusers and, with ``record``,
    the model card (``README.md``), its sample grid and ``training.json`` (the step and images seen)."""
    check_shippable(type(pipe), type(pipe.unet))
    pipe.save_pretrained(directory)  # with the code that opens it (pipeline.saving.write_code)
    if record is not None:
        write_model_card(pipe, directory, record)
        (directory / TRAINING_FILE).write_text(json.dumps({"step": record.step, "images_seen": record.images_seen}) + "\n")


def check_shippable(pipeline_class: type, unet_class: type) -> None:
    """ExportError unless plain diffusers can load the code ``pipeline.saving.write_code`` ships for these classes: the
    pipeline's module with its relative imports (``shipped_files``) and the U-Net's module alone in ``unet/``."""
    shipped_files(Path(inspect.getfile(pipeline_class)))
    unet_file = Path(inspect.getfile(unet_class))
    if local_imports(unet_file):
        raise ExportError(f"{unet_file} imports modules beside it; diffusers loads a component from one file")


def shipped_files(module_file: Path) -> list[Path]:
    """``module_file``'s name and the files of the modules it imports relatively, relative to its folder.

    Raises ExportError for an import plain diffusers cannot satisfy: a package other than ``SHIPPABLE_PACKAGES``,
    or a relative import in an imported module (diffusers copies those of the pipeline's own file only).
    """
    files = [Path(module_file.name)]
    for relative in local_imports(module_file):
        path = module_file.parent / relative
        if not path.is_file():
            raise ExportError(f"{module_file.name} imports {relative}, which is not a module file beside it")
        if local_imports(path):
            raise ExportError(f"{relative} imports modules beside it; diffusers only copies the pipeline file's own")
        files.append(relative)
    return files


def local_imports(module_file: Path) -> list[Path]:
    """The files of ``module_file``'s relative imports (``from .a.b import c`` -> ``a/b.py``); raises ExportError for
    an absolute import outside the standard library and ``SHIPPABLE_PACKAGES``."""
    files = []
    for level, module in relative_imports(module_file):
        # diffusers' loader copies ".a" and ".a.b" imports of one level (dynamic_modules_utils.get_cached_module_file)
        if level > 1 or not module or len(module.split(".")) > 2:
            raise ExportError(f"{module_file.name}: relative import {'.' * level}{module or ''} cannot be shipped")
        files.append(module_path(module))
    for node in ast.walk(ast.parse(module_file.read_text(), filename=str(module_file))):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in SHIPPABLE_PACKAGES:
                raise ExportError(
                    f"{module_file.name} imports {name}, which plain diffusers does not provide; "
                    f"shipped modules may import only the standard library, {', '.join(sorted(SHIPPABLE_PACKAGES))} and each other"
                )
    return files


def export_pipeline(unet: ConditionalUNet, scheduler: SchedulerMixin, output_dir: Path, record: TrainingRecord | None = None) -> Path:
    """Write ``output_dir/pipeline``: ``save_export`` of ``unet`` and ``scheduler`` (with a model card given
    ``record``), built beside it and swapped in whole. Returns the folder. ConfigError if ``output_dir/pipeline`` is
    there but no export (a training run checks this at its start, ``run_dir.claim``)."""
    final = output_dir / "pipeline"
    check_target(final, f"move it out of {output_dir}, or pick another train.output_dir")
    with rebuilt(final) as build:
        save_export(ConditionalDiffusionPipeline(unet=unet, scheduler=scheduler), build, record)
    return final


def publish(pipe: DiffusionPipeline, out: Path, record: TrainingRecord, half: bool, evaluation: Path | None,
            figure: Path | None = None) -> None:
    """A copy of a run's pipeline to commit or share: the self-contained export with its card in ``out``, the run's
    config as ``config.yaml`` inside it (so evaluation and figures take its sampler, steps and guidance), the U-Net's
    weights in float16 with ``half`` (``from_pretrained`` loads them as float32), the whole training record in
    ``training.json`` (so ``--rewrite-card`` can write the card again from the folder), and with ``evaluation`` (an
    ``evaluate --out`` JSON) that file as ``metrics.json``, its table and command at the end of the card, and its
    sampler, steps and guidance in the card, the sample grid and ``config.yaml``; with ``figure`` (a PNG: the run's
    quality against training time, say) that picture as ``FIGURE_FILE``, shown in the card's evaluation section.
    ConfigError if ``out`` holds anything but an export, or ``figure`` is no PNG file."""
    check_target(out, f"give --out a new or empty directory, or move what {out} holds elsewhere")
    if figure is not None and not (figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"):
        raise ConfigError(f"--figure {figure}: no PNG file there; pass a picture that `python -m pipeline.figures` drew")
    result = read_evaluation(evaluation) if evaluation is not None else None
    if result is not None:  # ship the sampling that was measured (a guidance chosen after training, say)
        record.eval_sample = record.eval_sample or record.config.sample  # what the in-training evaluation sampled
        record.config.sample = decode(SampleConfig, result["sample"])  # JSON lists back to tuples; older files lack keys
    with rebuilt(out) as build:
        save_export(pipe, build, record)
        if half:  # after the card's sample grid, which a CPU draws in float32
            pipe.unet.half().save_pretrained(str(build / "unet"))
        record.config.save(build / "config.yaml")
        if result is not None:
            shutil.copyfile(evaluation, build / "metrics.json")
        if figure is not None:
            shutil.copyfile(figure, build / FIGURE_FILE)
        write_card(pipe, build, record, last_metrics(record.run_dir), result)


def write_card(pipe: DiffusionPipeline, folder: Path, record: TrainingRecord, metrics: dict[str, tuple[int, float]],
               result: dict | None) -> None:
    """The published ``folder``'s ``README.md`` (with ``result``'s measured section) and its ``training.json``
    (``TrainingRecord.to_json``: what the card says beyond the folder's config, weights and ``metrics.json``)."""
    (folder / TRAINING_FILE).write_text(json.dumps(record.to_json(metrics), indent=2) + "\n")
    (folder / "README.md").write_text(model_card_text(pipe, record, metrics, shipped_code(folder), result,
                                                      figure=(folder / FIGURE_FILE).is_file()))


def saved_record(folder: Path) -> tuple[TrainingRecord, dict[str, tuple[int, float]]]:
    """(the training record, the last in-training metrics) that the published ``folder`` keeps in ``config.yaml`` and
    ``training.json`` (``TrainingRecord.to_json``; a file without its newer keys gives a card that says they were not
    recorded). ConfigError if either file is missing or unreadable."""
    try:
        saved = json.loads((folder / TRAINING_FILE).read_text())
        config: Config = load_config(folder / "config.yaml")
        sample = decode(SampleConfig, saved["eval_sample"]) if saved.get("eval_sample") else None
        record = TrainingRecord(config=config, step=int(saved["step"]), images_seen=int(saved["images_seen"]), run_dir=folder,
                                command=saved.get("command"), starts=saved.get("starts"), eval_sample=sample)
        metrics = {tag: (int(step), float(value)) for tag, (step, value) in (saved.get("eval_metrics") or {}).items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{folder}: no readable {TRAINING_FILE} and config.yaml ({error}); only a copy that `python -m "
                          "pipeline.export RUN --out DIR` published has both") from None
    return record, metrics


def rewrite_card(folder: Path) -> None:
    """Write the published ``folder``'s card (and ``training.json``, in the current format) again with this checkout's
    card code, from what the folder holds: ``config.yaml``, ``training.json``, ``metrics.json`` if there, the weights
    (class names, size, scheduler) and the code files. Weights, configs, grid, metrics and code are copied byte for
    byte (``pipeline.atomic.rebuilt``). ConfigError if ``folder`` is no published export."""
    if not (folder / EXPORT_MARKER).is_file():
        raise ConfigError(f"{folder} is not an exported pipeline (no {EXPORT_MARKER}); pass an export's folder")
    record, metrics = saved_record(folder)
    result = read_evaluation(folder / "metrics.json") if (folder / "metrics.json").is_file() else None
    pipe = ConditionalDiffusionPipeline.from_pretrained(folder)
    with rebuilt(folder) as build:
        shutil.copytree(folder, build, dirs_exist_ok=True)
        write_card(pipe, build, record, metrics, result)


def read_evaluation(path: Path) -> dict:
    """The ``evaluate --out`` JSON at ``path``; ConfigError if it cannot be read or is not such a file."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--evaluation {path}: cannot be read ({error}); pass a file that `evaluate --out` wrote") from None
    if not isinstance(result, dict) or "sample" not in result or "rows" not in result:
        raise ConfigError(f"--evaluation {path}: not an `evaluate --out` file (no 'sample' and 'rows'); pass one that it wrote")
    return result


def update_code(folder: Path) -> None:
    """Put this checkout's code in the export ``folder``: its ``.py`` files (those no longer shipped are dropped),
    the class names in ``model_index.json`` and the card's list of the shipped files. Every other file (weights,
    configs, sample grid, ``metrics.json``, the rest of the card) is copied byte for byte. Refused if ``folder`` is
    no export (ConfigError) or the new code cannot open its weights (that error, the folder unchanged)."""
    if not (folder / EXPORT_MARKER).is_file():
        raise ConfigError(f"{folder} is not an exported pipeline (no {EXPORT_MARKER}); pass an export's folder")
    with rebuilt(folder) as build:
        shutil.copytree(folder, build, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        for directory in sorted(build.rglob("*"), reverse=True):  # deepest first: a folder that only held code goes
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        check_shippable(ConditionalDiffusionPipeline, ConditionalUNet)
        write_code(build, ConditionalDiffusionPipeline, ConditionalUNet)
        card = build / "README.md"
        if card.is_file():
            card.write_text(with_shipped_code(card.read_text(), shipped_code(build)))
        ConditionalDiffusionPipeline.from_pretrained(build)  # the new code opens the weights, or the old folder stays


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.export RUN_DIR``: rewrite ``RUN_DIR/pipeline`` as a self-contained export with a card;
    with ``--out DIR``, publish a copy there instead (``--half``, ``--evaluation``, ``--command``: see ``publish``).
    ``python -m pipeline.export --update-code DIR``: only replace the code of the export DIR (see ``update_code``);
    ``--rewrite-card DIR``: only write the card of the published DIR again (see ``rewrite_card``)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=main.__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("run_dir", type=Path, nargs="?", help="a training run's output directory (pipeline/ and config.yaml)")
    source.add_argument("--update-code", type=Path, metavar="DIR",
                        help="an export (e.g. data/pretrained/NAME) to give this checkout's code, keeping its weights and card")
    source.add_argument("--rewrite-card", type=Path, metavar="DIR",
                        help="a published export (e.g. data/pretrained/NAME) whose card to write again from what it holds")
    parser.add_argument("--out", type=Path, help="publish a copy here (e.g. data/pretrained/NAME) instead of rewriting RUN_DIR/pipeline")
    parser.add_argument("--half", action="store_true", help="with --out: store the U-Net's weights in float16")
    parser.add_argument("--evaluation", type=Path, help="with --out: an `evaluate --out` JSON to ship and show on the card")
    parser.add_argument("--command", help="with --out: the training command to show on the card")
    parser.add_argument("--figure", type=Path, help="with --out: a PNG to ship and show in the card's evaluation section "
                                                    "(e.g. python -m pipeline.figures curve or time-to-fid)")
    args = parser.parse_args(argv)
    try:
        if args.update_code is not None or args.rewrite_card is not None:
            flag = "--update-code" if args.update_code is not None else "--rewrite-card"
            if args.out or args.half or args.evaluation or args.command or args.figure:
                raise ConfigError(f"{flag} takes no other option: it keeps the export's weights, config and metrics")
            if args.update_code is not None:
                update_code(args.update_code)
                print(f"updated the code in {args.update_code} (weights, config, card and metrics kept)")
            else:
                rewrite_card(args.rewrite_card)
                print(f"rewrote the card of {args.rewrite_card} (weights, config, code and metrics kept)")
            return 0
        folder = args.run_dir / "pipeline"
        if not (folder / EXPORT_MARKER).is_file():
            raise ConfigError(f"{folder} is not an exported pipeline (no {EXPORT_MARKER}); pass a training run's output directory")
        if args.out is None and (args.half or args.evaluation or args.command or args.figure):
            raise ConfigError("--half, --evaluation, --command and --figure go with --out (a published copy), not a rewrite of "
                              "the run")
        record = TrainingRecord.of_run(args.run_dir, saved_run_config(folder))
        if (step := exported_step(folder)) is not None:  # the weights' own step; status.json may be a later start's
            record.step, record.images_seen = step, step * record.config.train.batch_size
        record.command = args.command
        pipe = ConditionalDiffusionPipeline.from_pretrained(folder)
        if args.out is not None:
            publish(pipe, args.out, record, args.half, args.evaluation, args.figure)
            print(f"wrote {args.out} (self-contained, README.md{', float16 weights' if args.half else ''})")
        else:
            export_pipeline(pipe.unet, pipe.scheduler, args.run_dir, record)
            print(f"wrote {folder} (self-contained, README.md)")
    except ConfigError as error:  # bad input only: any other error, ExportError included, keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
