"""The status model shared by ``fsrdzv status``, ``list`` and ``gc``: JSON-able dicts built from a store.

Clock model. No timestamp written by another host is ever compared with this host's clock. A heartbeat's age is
"seconds since *this observer* saw the record change", timed on this process's monotonic clock by a
:class:`HeartbeatObserver` that remembers each record's tag and when the tag last changed. A one-shot ``status``
therefore looks twice, ``observe`` seconds apart; a record that did not change while we watched has an age that is
only a lower bound (``age_is_lower_bound``). ``status --watch`` keeps one observer for its whole life, so the ages
become exact once each record has changed once.

The idle age of a whole run (``list``, ``gc --older-than``) is coarse by nature: it is this host's wall clock minus
the newest modification time the *storage* reports for the run's objects. It is only used with thresholds of
minutes or hours, where the clock offset that ``fsrdzv doctor`` measures does not matter.

The JSON produced here is a documented, versioned contract (``docs/cli-json-schema.md``): add fields freely, but
renaming or removing one bumps the ``schema`` string.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from ._errors import RendezvousStateError, StorageError
from ._state import NodeInfo, RendezvousState, decode_state, request_owner
from ._store import Store

__all__ = [
    "LIST_SCHEMA",
    "STATUS_SCHEMA",
    "HeartbeatObserver",
    "collect_status",
    "fsspec_options",
    "info_mtime",
    "last_modified",
    "read_state",
    "run_summary",
]

#: Schema identifier of ``fsrdzv status --json`` (bump the number on any incompatible change).
STATUS_SCHEMA: Final = "fsrdzv.status/1"
#: Schema identifier of ``fsrdzv list --json``.
LIST_SCHEMA: Final = "fsrdzv.list/1"

#: Period of the heartbeat listings during a one-shot status's observation window (s).
OBSERVE_STEP: Final = 0.2

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class HeartbeatObserver:
    """Times heartbeat records on this process's monotonic clock (see the module docstring).

    For every record name it keeps ``(tag, first_seen, changed)``: the last tag listed, when this observer first
    saw that tag, and whether it has ever seen the tag change (if not, the true age is at least what we measured).
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, tuple[str, float, bool]] = {}
        self.observations = 0
        self.first_observation: float | None = None

    def now(self) -> float:
        return self._clock()

    def observe(self, tags: Mapping[str, str]) -> float:
        """Record one listing of ``{name: tag}`` and return the local time it was taken."""
        now = self._clock()
        if self.first_observation is None:
            self.first_observation = now
        first = self.observations == 0
        for name, tag in tags.items():
            previous = self._seen.get(name)
            if previous is None:
                # A record that appears after our first look was written while we watched: a real change.
                self._seen[name] = (tag, now, not first)
            elif previous[0] != tag:
                self._seen[name] = (tag, now, True)
        for gone in set(self._seen) - set(tags):
            del self._seen[gone]
        self.observations += 1
        return now

    def heartbeat(self, name: str, now: float | None = None) -> dict[str, Any]:
        """The ``heartbeat`` object of the JSON schema for record ``name``."""
        seen = self._seen.get(name)
        if seen is None:
            return {"present": False, "changed": False, "age_seconds": None, "age_is_lower_bound": False}
        now = self._clock() if now is None else now
        return {
            "present": True,
            "changed": seen[2],
            "age_seconds": round(max(0.0, now - seen[1]), 3),
            "age_is_lower_bound": not seen[2],
        }

    def changed_since(self, start: float) -> set[str]:
        """Names whose tag changed (or that appeared) at or after local time ``start``."""
        return {name for name, (_, when, changed) in self._seen.items() if changed and when >= start}

    def names(self) -> set[str]:
        return set(self._seen)


def read_state(store: Store) -> RendezvousState | None:
    """Read and decode the run's document (``None`` if there is none).

    :raises StateCorruptError: the document is unreadable; :raises StorageError: the storage failed.
    """
    snap = store.read()
    if snap is None:
        return None
    return decode_state(snap.data, store.describe("document"))


def _node_json(node_id: str, info: NodeInfo | None) -> dict[str, Any]:
    out: dict[str, Any] = {"node_id": node_id}
    if info is not None:
        out.update({"addr": info.addr, "host": info.host, "pid": info.pid, "port": info.port})
    else:  # pragma: no cover - decode_state guarantees an identity for every listed node
        out.update({"addr": None, "host": None, "pid": None, "port": None})
    return out


def collect_status(
    store: Store,
    endpoint: str,
    *,
    observer: HeartbeatObserver | None = None,
    observe: float = 1.0,
    sleep: Sleep = time.sleep,
) -> dict[str, Any]:
    """Build the ``fsrdzv.status/1`` object for ``store``'s run.

    Lists the heartbeat records every :data:`OBSERVE_STEP` for ``observe`` seconds (skipped when ``observer`` has
    looked before), then reads the document and lists the records again, so that every heartbeat gets an
    observed age.

    :raises StateCorruptError: the document is unreadable. :raises StorageError: the storage failed.
    """
    observer = observer or HeartbeatObserver()
    if observer.observations == 0 and observe > 0:
        read_state(store)  # an unreadable document fails now, not after the observation window
        # Several looks during the window, so that an age is known to within OBSERVE_STEP, not to the window.
        start = observer.observe(store.list_records("hb"))
        while True:
            left = start + observe - observer.now()
            if left <= 0:
                break
            sleep(min(OBSERVE_STEP, left))
            if left > OBSERVE_STEP:
                observer.observe(store.list_records("hb"))
    state = read_state(store)
    tags = store.list_records("hb")
    requests = {request_owner(name) for name in store.list_records("req")}
    now = observer.observe(tags)
    window = 0.0 if observer.first_observation is None else now - observer.first_observation
    doc: dict[str, Any] = {
        "schema": STATUS_SCHEMA,
        "endpoint": endpoint,
        "run_id": store.run_id,
        "exists": state is not None,
        "observed_seconds": round(window, 3),
    }
    if state is None:
        doc.update(
            {
                "round": None,
                "complete": False,
                "closed": False,
                "generation": None,
                "epoch": None,
                "last_call": None,
                "master": None,
                "participants": [],
                "waiting": [],
                "spares": [],
                "unlisted": [],
            }
        )
        return doc

    def entry(node_id: str) -> dict[str, Any]:
        out = _node_json(node_id, state.nodes.get(node_id))
        out["heartbeat"] = observer.heartbeat(node_id, now)
        return out

    participants = []
    # Ranks are only meaningful once the round is complete; before that every participant holds rank 0.
    order = sorted(state.participants, key=lambda n: (state.participants[n], state.nodes[n]))
    for node_id in order:
        item = entry(node_id)
        item["rank"] = state.participants[node_id] if state.complete else None
        participants.append(item)
    listed = state.members()
    unlisted = []
    for node_id in sorted((set(tags) | requests) - listed):
        item = {"node_id": node_id, "heartbeat": observer.heartbeat(node_id, now), "join_request": node_id in requests}
        unlisted.append(item)
    doc.update(
        {
            "round": state.round,
            "complete": state.complete,
            "closed": state.closed,
            "generation": state.generation,
            "epoch": state.epoch,
            "last_call": state.last_call,
            "master": None if state.master is None else {"addr": state.master[0], "port": state.master[1]},
            "participants": participants,
            "waiting": [entry(n) for n in sorted(state.wait_list, key=lambda n: state.nodes[n])],
            "spares": [entry(n) for n in sorted(state.redundancy_list, key=lambda n: state.nodes[n])],
            "unlisted": unlisted,
        }
    )
    return doc


def _epoch_seconds(value: object) -> float | None:
    """A modification time from an fsspec ``info`` dict value (datetime, ISO string or number)."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return _epoch_seconds(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
    return None


#: Keys under which fsspec implementations report a modification time (s3fs, adlfs, gcsfs, local).
_MTIME_KEYS: Final = ("LastModified", "last_modified", "updated", "mtime", "created")


def info_mtime(info: Mapping[str, Any]) -> float | None:
    """The modification time (epoch seconds) in an fsspec ``info`` dict, or None."""
    for key in _MTIME_KEYS:
        if key in info:
            got = _epoch_seconds(info[key])
            if got is not None:
                return got
    return None


#: Storage options that fsrdzv's stores consume themselves and fsspec would refuse.
_FSRDZV_ONLY_OPTIONS: Final = frozenset({"skip_selftest"})


def fsspec_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` as fsspec takes them: without fsrdzv's own keys, and with listings never cached.

    fsspec keeps one instance per set of options, so repeated calls (``list`` over many runs, ``status --watch``)
    share a connection; the listings cache is off so that each look sees the storage as it is now.
    """
    options = {k: v for k, v in (storage_options or {}).items() if k not in _FSRDZV_ONLY_OPTIONS}
    options["use_listings_cache"] = False
    return options


def _file_last_modified(path: str) -> float | None:
    newest: float | None = None
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                mtime = os.stat(os.path.join(root, name)).st_mtime
                newest = mtime if newest is None else max(newest, mtime)
    return newest


def last_modified(store: Store, endpoint: str, storage_options: Mapping[str, Any] | None = None) -> float | None:
    """Newest modification time (epoch seconds, storage clock) of any object of the run, or None if unknown.

    Directories are walked directly. Object stores are listed through fsspec under ``<prefix>/<run_id>/``; a store
    laid out differently, or an fsspec that refuses the options, gives None (the age is then unknown).
    """
    directory = getattr(store, "dir", None)
    if isinstance(directory, str) and os.path.isdir(directory):
        return _file_last_modified(directory)
    from ._stores import split_endpoint

    scheme, rest = split_endpoint(endpoint)
    if scheme in {"file", "memory"}:
        return None
    try:
        import fsspec

        fs = fsspec.filesystem(scheme, **fsspec_options(storage_options))
        found = fs.find(f"{rest}/{store.run_id}", detail=True)
    except Exception:  # noqa: BLE001 - the age is optional information; any failure means "unknown"
        return None
    times = [t for t in (info_mtime(i) for i in found.values()) if t is not None]
    return max(times) if times else None


def run_summary(
    store: Store, endpoint: str, storage_options: Mapping[str, Any] | None = None, now: float | None = None
) -> dict[str, Any]:
    """One entry of ``fsrdzv.list/1`` ``runs``. Per-run failures are reported in the entry, not raised."""
    out: dict[str, Any] = {
        "run_id": store.run_id,
        "state": "empty",
        "round": None,
        "complete": False,
        "closed": False,
        "generation": None,
        "participants": 0,
        "waiting": 0,
        "spares": 0,
        "heartbeat_records": 0,
        "idle_seconds": None,
        "error": None,
    }
    try:
        out["heartbeat_records"] = len(store.list_records("hb"))
        state = read_state(store)
    except RendezvousStateError as exc:
        out.update(state="corrupt", error=str(exc))
        state = None
    except StorageError as exc:
        out.update(state="error", error=str(exc))
        return out
    if state is not None:
        if state.closed:
            label = "closed"
        elif state.complete:
            label = "running"
        else:
            label = "forming"
        out.update(
            {
                "state": label,
                "round": state.round,
                "complete": state.complete,
                "closed": state.closed,
                "generation": state.generation,
                "participants": len(state.participants),
                "waiting": len(state.wait_list),
                "spares": len(state.redundancy_list),
            }
        )
    modified = last_modified(store, endpoint, storage_options)
    if modified is not None:
        now = time.time() if now is None else now
        out["idle_seconds"] = round(max(0.0, now - modified), 1)
    return out
