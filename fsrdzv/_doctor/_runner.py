"""Runs the selected checks on a scratch run and removes it."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._errors import ConfigurationError
from .._store import Store
from .._stores import open_store, split_endpoint
from ._cas import check_cas, check_reach
from ._check import CHECKS, Check
from ._clock import check_clock_directory, check_clock_store
from ._latency import check_latency
from ._lock import check_lock
from ._mount import check_mount
from ._space import check_space

__all__ = ["run_doctor"]


def run_doctor(
    endpoint: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    secret: bytes | None = None,
    checks: Sequence[str] = CHECKS,
    mountinfo: str | None = None,
    wrap_store: Callable[[Store], Store] | None = None,
    writers: int = 2,
    rounds: int = 5,
    samples: int = 10,
) -> list[Check]:
    """Run the selected checks against ``endpoint`` and return their outcomes (scratch data is removed).

    :param mountinfo: a mountinfo file, or its text (default ``/proc/self/mountinfo``).
    :param wrap_store: applied to every store the doctor opens (tests wrap them in a fault-injecting store).

    :raises ConfigurationError: a bad endpoint or option. :raises StorageError: the storage cannot be reached
        at all (the CLI reports it in one line).
    """
    options = dict(storage_options or {})
    scheme, rest = split_endpoint(endpoint)
    if scheme == "memory":
        raise ConfigurationError("memory:// lives inside one process; doctor checks shared storage")
    results: list[Check] = []
    run_id = f"fsrdzv-doctor-{secrets.token_hex(6)}"
    needs_store = any(c in checks for c in ("reach", "cas", "lock", "space", "clock", "latency"))
    # Read before any I/O: it needs no store, so ``--check mount`` works on a path this host cannot write.
    mount = _mount_check(scheme, rest, mountinfo) if "mount" in checks else None
    if not needs_store:
        return [mount] if mount is not None else []

    def open_one(run_id: str) -> Store:
        store = open_store(endpoint, run_id, storage_options=dict(options), secret=secret)
        return store if wrap_store is None else wrap_store(store)

    created_root = scheme == "file" and not os.path.isdir(os.path.expanduser(rest))
    store = open_one(run_id)
    try:
        # Reachability first, always: if the storage cannot be reached, the StorageError ends the doctor.
        reach = check_reach(store)
        run: dict[str, Callable[[], Check | None]] = {
            "reach": lambda: reach,
            "cas": lambda: check_cas(open_one, run_id, writers, rounds),
            "lock": lambda: check_lock(store),
            "mount": lambda: mount,
            "space": lambda: _space_check(store),
            "clock": lambda: _clock_check(store),
            "latency": lambda: check_latency(store, samples),
        }
        for name in CHECKS:
            outcome = run[name]() if name in checks else None
            if outcome is not None:
                results.append(outcome)
    finally:
        with contextlib.suppress(Exception):
            store.delete_run()
        store.close()
        if created_root:
            # The store created the endpoint's last level for the scratch run; leave the tree as we found it.
            with contextlib.suppress(OSError):
                os.rmdir(os.path.expanduser(rest))
    return results


def _mount_check(scheme: str, rest: str, mountinfo: str | None) -> Check:
    if scheme == "file":
        return check_mount(rest, mountinfo)
    return Check("mount", "skip", f"{scheme}:// is not a mounted file system")


def _space_check(store: Store) -> Check:
    directory = store.capabilities.directory
    if directory is None:
        return Check("space", "skip", "object stores have no space limit to check")
    os.makedirs(directory, exist_ok=True)
    return check_space(directory)


def _clock_check(store: Store) -> Check:
    directory = store.capabilities.directory
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        return check_clock_directory(directory)
    return check_clock_store(store)
