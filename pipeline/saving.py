"""What makes a saved pipeline folder self-contained: the code that opens it, and its weights' stored dtype.

``ConditionalDiffusionPipeline.save_pretrained`` (and so ``push_to_hub``) and ``pipeline.export`` both write a folder
through ``write_code``, so a folder saved from a loaded copy, whether loaded through this package or through plain
diffusers' ``trust_remote_code``, holds the same files and ``model_index.json`` as an export and opens again with only
torch and diffusers installed. Shipped with exports beside ``pipeline_conditional.py``: standard library and torch only.
"""

from __future__ import annotations

import ast
import inspect
import json
import shutil
import struct
from pathlib import Path

import torch

# safetensors' dtype names (the header's "dtype") of the floating-point dtypes a U-Net is stored in
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def relative_imports(module_file: Path) -> list[tuple[int, str | None]]:
    """``(level, module)`` of each relative import in ``module_file`` (``from .a.b import c`` -> ``(1, "a.b")``)."""
    tree = ast.parse(module_file.read_text(), filename=str(module_file))
    return [(node.level, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]


def module_path(module: str) -> Path:
    """The file of a one-level relative import's module, relative to the importing file's folder: ``a.b`` -> ``a/b.py``."""
    return Path(*module.split(".")).with_suffix(".py")


def write_code(directory: Path, pipeline_class: type, unet_class: type) -> None:
    """Copy ``pipeline_class``'s module with the modules it imports relatively, and ``unet_class``'s module as
    ``unet/<its name>.py``, into the saved pipeline ``directory``, and name them in its ``model_index.json``
    (``_class_name`` ``[file stem, class]``, ``unet`` ``[file stem, class]``: what ``trust_remote_code`` loads)."""
    directory = Path(directory)
    pipeline_file = Path(inspect.getfile(pipeline_class))
    for relative in [module_path(module) for _, module in relative_imports(pipeline_file) if module]:
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pipeline_file.parent / relative, directory / relative)
    shutil.copyfile(pipeline_file, directory / pipeline_file.name)
    unet_file = Path(inspect.getfile(unet_class))
    (directory / "unet").mkdir(exist_ok=True)
    shutil.copyfile(unet_file, directory / "unet" / f"{unet_file.stem}.py")

    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [pipeline_file.stem, pipeline_class.__name__]
    index["unet"] = [unet_file.stem, unet_class.__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def stored_dtype(model_folder: str | Path | None) -> torch.dtype | None:
    """The floating-point dtype the weights in ``model_folder`` (a saved model's folder, e.g. ``<pipeline>/unet``) are
    stored in, from the header of its ``.safetensors`` file; None when there is no such folder or file (a model built
    in memory, a hub id, ``.bin`` weights) or the header cannot be read."""
    if not model_folder or not Path(model_folder).is_dir():
        return None
    for weights in sorted(Path(model_folder).glob("*.safetensors")):
        try:
            with weights.open("rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(length))
        except (OSError, ValueError, struct.error):
            continue
        dtypes = {entry["dtype"] for name, entry in header.items() if name != "__metadata__" and isinstance(entry, dict)}
        floating = [STORED_DTYPES[name] for name in sorted(dtypes) if name in STORED_DTYPES]
        if len(floating) == 1:
            return floating[0]
    return None
