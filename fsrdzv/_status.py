"""The status model shared by ``fsrdzv status``, ``list`` and ``gc``: JSON-able dicts built from a store.

Clock model. No timestamp written by another host is ever compared with this host's clock. A heartbeat's age is
"seconds since *this observer* saw the record change", timed on this process's monotonic clock by a
:class:`~fsrdzv._liveness.LivenessTracker` (the handler's own liveness judgement). A one-shot ``status`` therefore
looks several times during ``observe`` seconds; a record that did not change while we watched has an age that is
only a lower bound (``age_is_lower_bound``). ``status --watch`` keeps one observer for its whole life, so the ages
become exact once each record has changed once.

The idle age of a whole run (``list``, ``gc --older-than``) is coarse by nature: it is this host's wall clock minus
the newest modification time the *storage* reports for the run's objects. It is only used with thresholds of
minutes or hours, where the clock offset that ``fsrdzv doctor`` measures does not matter.

The JSON produced here is a documented, versioned contract (``docs/cli-json-schema.md``): add fields freely, but
renaming or removing one bumps the ``schema`` string.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from ._errors import RendezvousStateError, StorageError
from ._liveness import LivenessTracker
from ._roster import missing_nodes, short_name
from ._scaleup import GATE_KIND, read_gate_records
from ._state import NodeInfo, RendezvousState, decode_state, request_owner
from ._store import Store

__all__ = [
    "LIST_SCHEMA",
    "STATUS_SCHEMA",
    "collect_status",
    "deferral_json",
    "heartbeat_json",
    "observe_heartbeats",
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


def observe_heartbeats(observer: LivenessTracker, tags: Mapping[str, str], now: float) -> None:
    """Record one listing of every heartbeat record (records that went away are forgotten)."""
    observer.observe(tags, now, tags)
    observer.forget(tags)


def heartbeat_json(observer: LivenessTracker, node_id: str, now: float) -> dict[str, Any]:
    """The ``heartbeat`` object of the JSON schema for ``node_id``."""
    age = observer.age(node_id, now)
    if age is None:
        return {"present": False, "changed": False, "age_seconds": None, "age_is_lower_bound": False}
    changed = observer.changed(node_id)
    return {"present": True, "changed": changed, "age_seconds": round(age, 3), "age_is_lower_bound": not changed}


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


_NO_DOCUMENT: Final[Mapping[str, Any]] = {
    "round": None,
    "complete": False,
    "closed": False,
    "generation": None,
    "epoch": None,
    "last_call": None,
    "master": None,
}


def _watch_window(store: Store, observer: LivenessTracker, observe: float, clock: Clock, sleep: Sleep) -> None:
    # Several looks during the window, so that an age is known to within OBSERVE_STEP, not to the window.
    start = clock()
    observe_heartbeats(observer, store.list_records("hb"), start)
    while True:
        left = start + observe - clock()
        if left <= 0:
            return
        sleep(min(OBSERVE_STEP, left))
        if left > OBSERVE_STEP:
            observe_heartbeats(observer, store.list_records("hb"), clock())


def _nodes_json(state: RendezvousState, observer: LivenessTracker, now: float) -> dict[str, Any]:
    """The node lists of the status object: participants (ranked once complete), waiting, spares, unlisted."""

    def entry(node_id: str) -> dict[str, Any]:
        out = _node_json(node_id, state.nodes.get(node_id))
        out["heartbeat"] = heartbeat_json(observer, node_id, now)
        return out

    participants = []
    # Ranks are only meaningful once the round is complete; before that every participant holds rank 0.
    for node_id in sorted(state.participants, key=lambda n: (state.participants[n], state.nodes[n])):
        item = entry(node_id)
        item["rank"] = state.participants[node_id] if state.complete else None
        participants.append(item)
    return {
        "participants": participants,
        "waiting": [entry(n) for n in sorted(state.wait_list, key=lambda n: state.nodes[n])],
        "spares": [entry(n) for n in sorted(state.redundancy_list, key=lambda n: state.nodes[n])],
    }


def deferral_json(store: Store, state: RendezvousState) -> dict[str, Any] | None:
    """The ``scale_up`` object: waiting nodes that ``scale_up_at=safe_point`` holds back, or None.

    From the record the round's rank 0 writes when it starts to defer (no record: nobody defers). ``since`` is that
    node's wall clock (Unix seconds), for display only.
    """
    if not state.wait_list or not state.complete:
        return None
    records = read_gate_records(lambda: store.list_records(GATE_KIND), lambda name: store.read_record(GATE_KIND, name))
    current = [r for r in records if r.get("round") == state.round and r.get("epoch") == state.epoch]
    if not current:
        return None
    record = current[0]
    return {
        "at": "safe_point",
        "deferred": [{"node_id": n} for n in sorted(state.wait_list, key=lambda n: state.nodes[n])],
        "since": record["since"],
        "max_delay_seconds": record["max_delay"],
        "deferred_by": record["by"],
    }


def expected_json(
    state: RendezvousState, tags: Mapping[str, str], observer: LivenessTracker, now: float
) -> dict[str, Any] | None:
    """The ``expected`` object: the run's expected roster (``config.expected_nodes``) and the names no member of
    the document runs on, each with the heartbeat of a record whose node id names that host, if any; or None."""
    names = list((state.config or {}).get("expected_nodes") or [])
    if not names:
        return None
    members = state.members()
    present = {short_name(i.host or i.addr) for n, i in state.nodes.items() if n in members}
    missing = []
    for name in missing_nodes(names, present):
        records = sorted(n for n in tags if short_name(n.rsplit("_", 3)[0]) == short_name(name))
        beats = [heartbeat_json(observer, n, now) for n in records]
        missing.append({"name": name, "heartbeat": min(beats, key=lambda b: b["age_seconds"] or 0.0, default=None)})
    return {"nodes": names, "missing": missing}


def collect_status(
    store: Store,
    endpoint: str,
    *,
    observer: LivenessTracker | None = None,
    observe: float = 1.0,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> dict[str, Any]:
    """Build the ``fsrdzv.status/1`` object for ``store``'s run.

    Lists the heartbeat records every :data:`OBSERVE_STEP` for ``observe`` seconds (skipped when ``observer`` has
    looked before), then reads the document and lists the records again, so that every heartbeat gets an
    observed age.

    :raises StateCorruptError: the document is unreadable. :raises StorageError: the storage failed.
    """
    observer = observer or LivenessTracker.observer()
    if observer.observations == 0 and observe > 0:
        read_state(store)  # an unreadable document fails now, not after the observation window
        _watch_window(store, observer, observe, clock, sleep)
    state = read_state(store)
    tags = store.list_records("hb")
    requests = {request_owner(name) for name in store.list_records("req")}
    now = clock()
    observe_heartbeats(observer, tags, now)
    first = observer.first_observation
    doc: dict[str, Any] = {
        "schema": STATUS_SCHEMA,
        "endpoint": endpoint,
        "run_id": store.run_id,
        "exists": state is not None,
        "observed_seconds": round(0.0 if first is None else now - first, 3),
    }
    if state is None:
        doc.update({**_NO_DOCUMENT, "participants": [], "waiting": [], "spares": [], "unlisted": [], "scale_up": None})
        doc["expected"] = None
        return doc
    doc["scale_up"] = deferral_json(store, state)
    doc["expected"] = expected_json(state, tags, observer, now)
    unlisted = [
        {"node_id": n, "heartbeat": heartbeat_json(observer, n, now), "join_request": n in requests}
        for n in sorted((set(tags) | requests) - state.members())
    ]
    doc.update(
        {
            "round": state.round,
            "complete": state.complete,
            "closed": state.closed,
            "generation": state.generation,
            "epoch": state.epoch,
            "last_call": state.last_call,
            "master": None if state.master is None else {"addr": state.master[0], "port": state.master[1]},
            **_nodes_json(state, observer, now),
            "unlisted": unlisted,
        }
    )
    return doc


def run_summary(store: Store, now: float | None = None) -> dict[str, Any]:
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
    modified = store.last_modified()
    if modified is not None:
        now = time.time() if now is None else now
        out["idle_seconds"] = round(max(0.0, now - modified), 1)
    return out
