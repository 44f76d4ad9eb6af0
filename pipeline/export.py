"""Self-contained exports: a ``save_pretrained`` folder that plain diffusers opens, with its code and model card.

The folder carries this project's own modules, copied at export: the pipeline's module
(``pipeline_conditional.py``) with the modules it imports relatively (``sampler_checks.py``,
``models/unet.py``), and the U-Net's module as ``unet/unet.py`` (diffusers' convention for a custom
component). ``model_index.json`` names them, so that

>>> DiffusionPipeline.from_pretrained("runs/quickstart/pipeline", trust_remote_code=True)

loads with only torch and diffusers installed. Every shipped file is checked to import nothing but the standard
library, torch, diffusers (and numpy and PIL, which diffusers requires) and the files shipped beside it.

``python -m pipeline.export RUN_DIR`` re-exports a run's ``pipeline/`` folder in this form (an older export, or
a committed pretrained pipeline with the ``config.yaml`` of its run beside it).
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
from pathlib import Path

from diffusers import DiffusionPipeline

from pipeline.config import SampleConfig, decode
from pipeline.model_card import TrainingRecord, write_model_card

# what a shipped module may import besides the standard library and the files shipped beside it
SHIPPABLE_PACKAGES = frozenset({"torch", "diffusers", "numpy", "PIL"})


class ExportError(ValueError):
    """A module that cannot be shipped: it imports something plain diffusers does not provide."""


def save_export(pipe: DiffusionPipeline, directory: Path, record: TrainingRecord | None = None) -> None:
    """``pipe.save_pretrained(directory)`` plus the code that opens it in plain diffusers and, with ``record``,
    the model card (``README.md``) and its sample grid."""
    pipe.save_pretrained(directory)
    pipeline_file = Path(sys.modules[type(pipe).__module__].__file__)
    for relative in shipped_files(pipeline_file):
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pipeline_file.parent / relative, target)
    unet_file = Path(sys.modules[type(pipe.unet).__module__].__file__)
    if local_imports(unet_file):
        raise ExportError(f"{unet_file} imports modules beside it; diffusers loads a component from one file")
    shutil.copyfile(unet_file, directory / "unet" / unet_file.name)

    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [pipeline_file.stem, type(pipe).__name__]
    index["unet"] = [unet_file.stem, type(pipe.unet).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if record is not None:
        write_model_card(pipe, directory, record)


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
    tree = ast.parse(module_file.read_text(), filename=str(module_file))
    files = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = (node.module or "").split(".")
            # diffusers' loader copies ".a" and ".a.b" imports of one level (dynamic_modules_utils.get_cached_module_file)
            if node.level > 1 or not node.module or len(parts) > 2:
                raise ExportError(f"{module_file.name}: relative import {'.' * node.level}{node.module or ''} cannot be shipped")
            files.append(Path(*parts).with_suffix(".py"))
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


def publish(pipe: DiffusionPipeline, out: Path, record: TrainingRecord, half: bool, evaluation: Path | None) -> None:
    """A copy of a run's pipeline to commit or share: the self-contained export with its card in ``out``, the run's
    config as ``config.yaml`` inside it (so evaluation and figures take its sampler, steps and guidance), the U-Net's
    weights in float16 with ``half`` (``from_pretrained`` loads them as float32), and with ``evaluation`` (an
    ``evaluate --out`` JSON) that file as ``metrics.json``, its table at the end of the card, and its sampler, steps
    and guidance in the card, the sample grid and ``config.yaml``."""
    from pipeline.checkpointing import replace_dir
    from pipeline.evaluation.metrics import markdown_table

    result = json.loads(evaluation.read_text()) if evaluation is not None else None
    if result is not None:  # ship the sampling that was measured (a guidance chosen after training, say)
        record.config.sample = decode(SampleConfig, result["sample"])  # JSON lists back to tuples; older files lack keys
    build = out.parent / f".tmp-{out.name}"
    save_export(pipe, build, record)
    if half:  # after the card's sample grid, which a CPU draws in float32
        pipe.unet.half().save_pretrained(str(build / "unet"))
    record.config.save(build / "config.yaml")
    if result is not None:
        shutil.copyfile(evaluation, build / "metrics.json")
        sample = record.config.sample
        reference = result["reference"]
        card = build / "README.md"
        card.write_text(card.read_text() + "\n" + "\n".join([
            "## Measured", "",
            f"`python -m pipeline.evaluation evaluate` ({result['per_class']} samples per class, {sample.sampler} "
            f"{sample.num_inference_steps} steps, {sample.guidance_text()}; distances against the "
            f"{reference['split']} split, {reference['max_samples'] or 'all'} images; {result.get('hardware', '')}; "
            "`metrics.json` has every number):", "",
            markdown_table(result["rows"]),
        ]))
    replace_dir(build, out)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.export RUN_DIR``: rewrite ``RUN_DIR/pipeline`` as a self-contained export with a card;
    with ``--out DIR``, publish a copy there instead (``--half``, ``--evaluation``, ``--command``: see ``publish``)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=main.__doc__)
    parser.add_argument("run_dir", type=Path, help="a training run's output directory (pipeline/ and config.yaml)")
    parser.add_argument("--out", type=Path, help="publish a copy here (e.g. data/pretrained/NAME) instead of rewriting RUN_DIR/pipeline")
    parser.add_argument("--half", action="store_true", help="with --out: store the U-Net's weights in float16")
    parser.add_argument("--evaluation", type=Path, help="with --out: an `evaluate --out` JSON to ship and show on the card")
    parser.add_argument("--command", help="with --out: the training command to show on the card")
    args = parser.parse_args(argv)
    from pipeline.checkpointing import replace_dir
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
    from pipeline.sampling import saved_run_config

    folder = args.run_dir / "pipeline"
    try:
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} is not an exported pipeline (no model_index.json)")
        if args.out is None and (args.half or args.evaluation or args.command):
            raise ValueError("--half, --evaluation and --command go with --out (a published copy), not a rewrite of the run")
        record = TrainingRecord.of_run(args.run_dir, saved_run_config(folder))
        record.command = args.command
        pipe = ConditionalDiffusionPipeline.from_pretrained(folder)
        if args.out is not None:
            publish(pipe, args.out, record, args.half, args.evaluation)
            print(f"wrote {args.out} (self-contained, README.md{', float16 weights' if args.half else ''})")
            return 0
        build = args.run_dir / ".tmp-pipeline"
        save_export(pipe, build, record)
    except ValueError as error:  # ConfigError and ExportError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    replace_dir(build, folder)
    print(f"wrote {folder} (self-contained, README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
