"""Markdown that shows text as written: escaping for model cards (``pipeline.model_card``), where class names, data
set paths and commands come from users and data and must never render as links, HTML or the end of a block.
Standard library and yaml only."""

from __future__ import annotations

import html
import math
import re

import yaml


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
