"""Values of command-line options: durations with units, counts, node ranges, storage options.

The judgement of a value (positive, at least N) is :mod:`fsrdzv._settings`'s; this module adds the command line's
syntax (``500ms``, ``2m``, ``MIN:MAX``, ``-o KEY=VALUE``) and argparse's one-line messages.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .._environ import storage_options_from_env
from .._errors import ConfigurationError
from .._settings import parse_count, parse_seconds, set_nested
from ._exits import EXIT_USAGE, CliError

__all__ = ["count", "parse_duration", "parse_nnodes", "parse_storage_options", "positive_duration"]

_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h|d|w)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"1.5m"``, ``"24h"``, ``"7d"``, ``"250ms"`` -> seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use seconds or a number with ms, s, m, h, d, w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def positive_duration(text: str) -> float:
    """A duration that must be greater than zero."""
    value = parse_duration(text)
    try:
        return parse_seconds("duration", value)
    except ConfigurationError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be greater than zero") from None


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        try:
            return parse_count("count", text, minimum)
        except ConfigurationError:
            raise argparse.ArgumentTypeError(f"{int(text)} is below the minimum {minimum}") from None

    parse.__name__ = "integer"
    return parse


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` -> ``(min, max)``."""
    low, sep, high = text.partition(":")
    try:
        lo = int(low)
        hi = int(high) if sep else lo
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid node count {text!r}: use N or MIN:MAX, e.g. 2:4") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"invalid node count {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def parse_storage_options(items: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge ``$FSRDZV_STORAGE_OPTIONS`` (a JSON object) with ``-o KEY=VALUE`` items.

    VALUE is JSON when it parses (``true``, ``2``, ``{"a": 1}``), else a string; dotted keys nest
    (``client_kwargs.region_name=us-east-1``).
    """
    options = storage_options_from_env(environ)
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(
                f"invalid storage option {item!r}: use KEY=VALUE, e.g. -o lock=false or -o endpoint_url=http://...",
                EXIT_USAGE,
            )
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        set_nested(options, key, value)
    return options
