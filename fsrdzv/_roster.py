"""The nodes a job expects, where the environment says so: ``SLURM_JOB_NODELIST`` or an explicit list.

Slurm's compact host list syntax is expanded here without ``scontrol``: ``node[01-03,07],gpu5`` is ``node01``,
``node02``, ``node03``, ``node07``, ``gpu5`` (ranges keep their zero padding; several bracket groups multiply).
Names are compared by their first label (``node01.cluster`` is ``node01``), as Slurm names its nodes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

from ._errors import ConfigurationError

__all__ = ["expand_nodelist", "expected_nodes", "missing_nodes", "short_name"]

_GROUP = re.compile(r"\[([^\[\]]*)\]")


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [part.strip() for part in out if part.strip()]


def _range(item: str, where: str) -> list[str]:
    lo, sep, hi = item.partition("-")
    if not sep:
        return [lo]
    if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
        raise ConfigurationError(f"invalid node range {item!r} in {where!r}: expected e.g. node[01-03,07]")
    return [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]


def _expand_one(name: str, where: str) -> list[str]:
    match = _GROUP.search(name)
    if match is None:
        if "[" in name or "]" in name:
            raise ConfigurationError(f"unbalanced brackets in {where!r}: expected e.g. node[01-03,07]")
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    items = [n for item in match.group(1).split(",") if item.strip() for n in _range(item.strip(), where)]
    return [head + n + rest for n in items for rest in _expand_one(tail, where)]


def expand_nodelist(text: str) -> list[str]:
    """Slurm's host list ``node[01-03,07],gpu5`` as names, in order, without duplicates.

    :raises ConfigurationError: malformed brackets or ranges.
    """
    names = [n for part in _split_top(text) for n in _expand_one(part, text)]
    return list(dict.fromkeys(names))


def short_name(name: str) -> str:
    return name.split(".", 1)[0]


def expected_nodes(explicit: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The expected roster: ``explicit`` (items may use Slurm's syntax), else ``SLURM_JOB_NODELIST``, else none."""
    env = os.environ if environ is None else environ
    if explicit:
        return tuple(dict.fromkeys(n for item in explicit for n in expand_nodelist(item)))
    listed = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return tuple(expand_nodelist(listed)) if listed else ()


def missing_nodes(expected: Iterable[str], hosts: Iterable[str]) -> list[str]:
    """Expected names with no node among ``hosts`` (first labels compared)."""
    present = {short_name(h) for h in hosts}
    return [n for n in expected if short_name(n) not in present]
