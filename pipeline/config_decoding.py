"""How raw config values (YAML, command-line strings) become typed values: draccus decoders and a YAML 1.2 loader.

The config's dataclasses are decoded by draccus (the dataclass configuration library LeRobot uses):
``draccus.decode`` builds the sections from nested mappings and ``draccus.encode`` gives what ``Config.save``
writes. The spellings (lists as ``1,2,2`` or ``"[1, 2, 2]"``; booleans as true/false, yes/no, on/off or 1/0;
``none``, ``null`` or "" for unset) and the "did you mean" for choices are the decoders below, registered with
``draccus.decode.register``, the library's extension point, when this module is imported; they replace draccus'
own for ``bool``, ``int``, ``float``, ``str``, tuples, ``Literal`` and unions in this process (nothing else here
uses draccus). Tried and not used: ``draccus.parse`` reads command-line values as YAML 1.1
(``--train.mixed_precision no`` becomes False), iterates ``1,2,2`` as characters and exits with argparse's
messages, so ``pipeline.config.parse_overrides`` splits the command line and YAML files are read with
``Yaml12Loader``; OmegaConf 2.4 structured configs take these dataclasses but have no hook for the comma and
``none`` spellings; tyro was not tried.

Imports only the standard library, draccus and yaml.
"""

from __future__ import annotations

import argparse
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import draccus
import yaml
from draccus.parsers.decoding import get_decoding_fn
from draccus.utils import DecodingError


class Yaml12Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2): ``mixed_precision: no`` stays the string "no"."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def close_matches(name: str, options: Sequence[str], most: int = 4) -> str:
    """The fix for a misspelt or shortened ``name``: the ``options`` it starts, then those it is part of (``dpm``:
    ``dpmsolver++``, ``ddpm``; difflib alone misses ``dpmsolver++``), then the closest by spelling, at most ``most``;
    or all of them when none is near. The one "did you mean" of every choice: config keys, ``Literal`` values and
    the command lines' choices (``choice_flag``)."""
    typed = name.lower()
    starts = [option for option in options if typed and option.lower().startswith(typed)]
    within = [option for option in options if typed and typed in option.lower()]
    near = list(dict.fromkeys([*starts, *within, *difflib.get_close_matches(name, options, n=3, cutoff=0.5)]))[:most]
    return f"did you mean {', '.join(near)}?" if near else f"valid: {', '.join(options)}"


def choice_flag(options: Sequence[str]) -> dict[str, Any]:
    """``argparse`` keywords for a flag taking one of ``options`` (in place of ``choices=``, whose refusal lists them
    all): ``parser.add_argument("--mixed-precision", **choice_flag(SAMPLING_PRECISIONS))``; anything else is refused
    with ``close_matches``' fix, exit 2."""
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; {close_matches(text, list(options))}")
        return text

    return {"type": parse, "metavar": "{" + ",".join(options) + "}"}


# The decoders below are registered with include_subclasses=True so that draccus passes them the declared type
# and calls them for None too (its plain registrations turn None into None for any type).


def _decode_bool(hint: type, raw: Any, path: Sequence[str]) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return raw.lower() in ("true", "yes", "1", "on")
    raise DecodingError(path, f"expected true or false, got {raw!r}")


def _decode_number(hint: type, raw: Any, path: Sequence[str]) -> int | float:
    if isinstance(raw, bool):  # YAML true/false would silently become 1/0
        raise DecodingError(path, f"expected {hint.__name__}, got {raw!r}")
    try:
        number = hint(raw)
    except (TypeError, ValueError, OverflowError):
        raise DecodingError(path, f"expected {hint.__name__}, got {raw!r}") from None
    if isinstance(raw, float) and number != raw:  # int(2.5) would silently truncate
        raise DecodingError(path, f"expected an integer, got {raw!r}")
    return number


def _decode_str(hint: type, raw: Any, path: Sequence[str]) -> str:
    if raw is None:
        raise DecodingError(path, "expected a string")
    return str(raw)


def _decode_choice(hint: Any, raw: Any, path: Sequence[str]) -> Any:
    choices = typing.get_args(hint)
    if raw not in choices:
        raise DecodingError(path, f"{raw!r} is not allowed; {close_matches(str(raw), [str(c) for c in choices])}")
    return raw


def _decode_tuple(hint: Any, raw: Any, path: Sequence[str]) -> tuple:
    """``1,2,2`` or ``[1, 2, 2]`` (blank items dropped, so "" is empty), a YAML list, or one value; a fixed-length
    tuple (``tuple[float, float]``) needs exactly its number of items."""
    if isinstance(raw, str):
        text = raw.strip()
        if text[:1] + text[-1:] in ("[]", "()"):  # the YAML / Python spelling, as one would quote it on a command line
            text = text[1:-1]
        items: Sequence[Any] = [item.strip() for item in text.split(",") if item.strip()]
    else:
        items = raw if isinstance(raw, (list, tuple)) else [raw]
    types_ = typing.get_args(hint)
    if len(types_) == 2 and types_[1] is Ellipsis:
        types_ = (types_[0],) * len(items)
    elif len(items) != len(types_):
        raise DecodingError(path, f"expected {len(types_)} values, got {len(items)}: {raw!r}")
    return tuple(get_decoding_fn(kind)(item, path) for kind, item in zip(types_, items, strict=True))


def _decode_union(hint: Any, raw: Any, path: Sequence[str]) -> Any:
    """None for ``none``, ``null``, "" or YAML null where the type allows it, else the first member that decodes."""
    members = [member for member in typing.get_args(hint) if member is not type(None)]
    optional = len(members) < len(typing.get_args(hint))
    if optional and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", ""))):
        return None
    for member in members[:-1]:
        try:
            return get_decoding_fn(member)(raw, path)
        except DecodingError:
            continue
    return get_decoding_fn(members[-1])(raw, path)


for _type, _decoder in [(bool, _decode_bool), (int, _decode_number), (float, _decode_number), (str, _decode_str),
                        (tuple, _decode_tuple), (Literal, _decode_choice), (typing.Union, _decode_union),
                        (types.UnionType, _decode_union)]:
    draccus.decode.register(_type, _decoder, include_subclasses=True)
get_decoding_fn.cache_clear()  # draccus caches a decoder per type; none built before these registrations may stay


def read_yaml(path: Path) -> Any:
    """A config or study file, with YAML 1.2 booleans (only true/false), as ``Yaml12Loader`` reads them."""
    return yaml.load(path.read_text(), Loader=Yaml12Loader)


def type_name(hint: Any) -> str:
    """A config field's type as ``--help`` shows it: ``{a|b}``, ``int|none``, ``int,...``, ``float,float``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "{" + "|".join(map(str, args)) + "}"
    if origin in (typing.Union, types.UnionType):
        return type_name(next(a for a in args if a is not type(None))) + "|none"
    if origin in (tuple, list):
        return f"{type_name(args[0])},..." if len(args) == 1 or args[-1] is Ellipsis else ",".join(map(type_name, args))
    return getattr(hint, "__name__", str(hint))
