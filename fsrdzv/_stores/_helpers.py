"""Small helpers of the object stores: the check of storage options, batches, and a few threads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .._errors import ConfigurationError

__all__ = ["batches", "check_options", "in_threads"]

_T = TypeVar("_T")
_I = TypeVar("_I")

#: Threads of the stores that check or delete objects one request each.
_THREADS = 8


def check_options(options: dict[str, Any], known: frozenset[str], location: str) -> None:
    """Refuse storage options that the store does not know (a typo would otherwise be ignored)."""
    unknown = set(options) - known
    if unknown:
        raise ConfigurationError(f"unknown storage option(s) {sorted(unknown)} for {location}; known: {sorted(known)}")


def batches(items: list[_I], size: int) -> Iterator[list[_I]]:
    """``items`` in consecutive lists of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def in_threads(fn: Callable[[_I], _T], items: list[_I]) -> list[_T]:
    """``[fn(item) for item in items]`` on a few threads (for services that take one request per object)."""
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        return list(pool.map(fn, items))
