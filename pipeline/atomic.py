"""Writing a directory whole: build it in full next to its target, flush it to disk, swap it in.

Checkpoints (``pipeline.checkpointing``) and exports (``pipeline.export``) are written this way, so that a crash, a
full disk or a preempted job leaves at the target either the old directory or the new one, never a half-written
one. The build is ``.tmp-NAME`` beside the target (the same file system, so the swap is a rename); the old directory
is renamed aside to ``.tmp-NAME.old`` and stays until the new one is in place. Whatever starts with ``.tmp-`` is
therefore unfinished or on its way out: cloud syncs skip it (``launch/``) and checkpointing removes leftovers.

Exports are written with ``rebuilt``, which replaces only an export (a folder with ``EXPORT_MARKER``) or an empty
directory: a directory someone else filled is never deleted (``replace_problem``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"
EXPORT_MARKER = "model_index.json"  # diffusers' save_pretrained writes it: the file that makes a folder an export


def build_dir(final: Path) -> Path:
    """Where ``final``'s replacement is written before the swap: ``.tmp-NAME`` beside it."""
    return final.with_name(TMP_PREFIX + final.name)


def start_build(final: Path) -> Path:
    """``build_dir(final)``, created empty (what an interrupted write left there is removed)."""
    build = build_dir(final)
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    return build


def replace_dir(build: Path, final: Path) -> None:
    """Flush every file and directory of the fully written ``build`` to disk, then swap it in at ``final``: the old
    ``final`` (if any) is renamed aside, ``build`` renamed into its place, the rename flushed, and only then the old
    one deleted."""
    _fsync_tree(build)
    old = final.with_name(f"{TMP_PREFIX}{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(build, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def replace_problem(final: Path) -> str | None:
    """Why an export must not replace ``final`` (None if it may): it may replace nothing, an empty directory or an
    export (a folder with ``EXPORT_MARKER``); anything else holds what someone else put there, which the swap would
    delete."""
    if not final.exists() or (final.is_dir() and ((final / EXPORT_MARKER).is_file() or not any(final.iterdir()))):
        return None
    return f"{final} exists and is not an export (no {EXPORT_MARKER}), so writing the export there would delete what it holds"


@contextmanager
def rebuilt(final: Path) -> Iterator[Path]:
    """``with rebuilt(final) as build:`` write the new export ``final`` into the empty directory ``build``; when the
    block ends it is swapped in (``replace_dir``). If the block raises, ``final`` is left as it was and ``build``
    removed. FileExistsError, before anything is written, if ``final`` may not be replaced (``replace_problem``):
    callers check first, to name the fix in a ConfigError; this is the last guard."""
    if problem := replace_problem(final):
        raise FileExistsError(problem)
    build = start_build(final)
    try:
        yield build
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    replace_dir(build, final)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves to disk, so that a rename publishes them whole."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
