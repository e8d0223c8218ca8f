"""``fsrdzv gc``: remove finished runs, and delete what crashed nodes left in the runs it keeps.

Liveness is judged as the handler judges it, with a :class:`~fsrdzv._liveness.LivenessTracker`: a heartbeat record
that does not change for the run's liveness timeout (``keep_alive_interval x keep_alive_max_attempt`` as its
document records them, and at least ``--window``) of this host's monotonic clock is dead. No remote clock is read.

A run is removed whole when it is closed or shows no life, and is idle for ``--older-than``. In every run that is
kept (a live one too) the records of gone nodes are deleted, so that a crashed node's request is never folded
again whatever the document's history of departed nodes still holds:

- a node in no list of the document whose heartbeat record is dead: its heartbeat and all its join requests;
- a join request of a node in no list and without a heartbeat record that the document already folded (or an
  older one of that node): a leftover of a node that was removed.

A member's records, the records of a node whose heartbeat lives, and a request newer than what the document folded
for its node (a node that is joining writes its request before its first heartbeat) are never touched.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .._admin import RunAdmin
from .._errors import RendezvousStateError
from .._liveness import LivenessTracker
from .._state import RendezvousState, request_owner
from .._store import Store
from .._stores import list_runs, open_store
from .._text import one_line
from ._context import endpoint_of, not_found, run_exists, secret_of
from ._exits import EXIT_OK
from ._render import human, print_json

__all__ = ["GC_SCHEMA", "cmd_gc"]

#: Schema identifier of ``fsrdzv gc --json`` (docs/cli-json-schema.md).
GC_SCHEMA: Final = "fsrdzv.gc/1"
#: Gone nodes named per run in the human output (the JSON names them all).
_SHOWN: Final = 5


@dataclass
class _Watched:
    """A run being watched: what ``list`` said of it, the tracker of its heartbeats, and whether it may go whole."""

    store: Store
    summary: dict[str, Any]
    tracker: LivenessTracker
    candidate: bool
    started: float
    entry: dict[str, Any] = field(default_factory=dict)

    @property
    def due(self) -> float:
        return self.started + self.tracker.timeout


class _Sweep:
    """One ``gc`` pass: a verdict per run, and the gone nodes whose records it deletes in the runs it keeps."""

    def __init__(self, args: argparse.Namespace, endpoint: str) -> None:
        self.args = args
        self.endpoint = endpoint
        self.verb = "would remove" if args.dry_run else "removed"
        self.runs: list[dict[str, Any]] = []

    def _say(self, line: str) -> None:
        if not self.args.json:
            sys.stdout.write(line + "\n")

    def verdict(self, summary: Mapping[str, Any], verdict: str, reason: str, observed: float | None) -> dict[str, Any]:
        entry = {
            "run_id": summary["run_id"],
            "state": summary["state"],
            "verdict": verdict,
            "reason": reason,
            "idle_seconds": summary["idle_seconds"],
            "observed_seconds": None if observed is None else round(observed, 3),
            "gone_nodes": [],
        }
        self.runs.append(entry)
        if verdict == "keep":
            self._say(f"kept {summary['run_id']}: {reason}")
        else:
            self._say(f"{self.verb} {summary['run_id']}: {reason}, idle {human(summary['idle_seconds'])}")
        return entry

    def watch(self, store: Store, summary: dict[str, Any]) -> _Watched | None:
        """Start watching a run (None: it is kept unwatched, and why is reported)."""
        if summary["state"] == "corrupt":
            why = "unreadable document; inspect it with 'fsrdzv status' and replace it with 'fsrdzv reset --force'"
        elif summary["state"] == "error":
            why = f"storage error: {one_line(summary['error'], None)}"
        else:
            admin = RunAdmin(store)
            try:
                state = admin.read()
            except RendezvousStateError:
                why = "the document became unreadable"
            else:
                # Nothing the observer misses counts (max_gap inf): it errs towards "alive", never a false death.
                timeout = max(self.args.window, admin.recorded_liveness_timeout(state))
                tracker = LivenessTracker(timeout, max_gap=float("inf"))
                now = time.monotonic()
                tags = store.list_records("hb")
                tracker.observe(tags, now, tags)
                idle, older_than = summary["idle_seconds"], self.args.older_than
                young = older_than > 0 and (idle is None or idle < older_than)
                watched = _Watched(store, summary, tracker, not young, now)
                if young:
                    why = f"idle {'unknown' if idle is None else human(idle)}, not older than {human(older_than)}"
                    watched.entry = self.verdict(summary, "keep", why, None)
                return watched
        self.verdict(summary, "keep", why, None)
        return None

    def judge(self, run: _Watched) -> None:
        """Remove the run unless it showed life; in a run kept, delete the gone nodes' records."""
        store, summary, tracker = run.store, run.summary, run.tracker
        tags = store.list_records("hb")
        now = time.monotonic()
        tracker.observe(tags, now, tags)
        observed, timeout = now - run.started, tracker.timeout
        admin = RunAdmin(store)
        try:
            state = admin.read()
        except RendezvousStateError:
            self._settle(run, "the document became unreadable while watching", observed)
            return
        if run.candidate:
            live = set(tags) - tracker.dead(tags, now)
            if live:
                self._settle(run, f"live: {len(live)} heartbeat record(s) changed within {timeout:g}s", observed)
            elif state is not None and state.generation != summary["generation"]:
                self._settle(run, f"live: its document changed within {timeout:g}s", observed)
            elif self.args.dry_run or store.list_records("hb") == tags:  # a node that started meanwhile keeps it
                if not self.args.dry_run:
                    admin.delete_run()
                why = "closed" if summary["closed"] else "no heartbeat changed" if tags else "no node records"
                self.verdict(summary, "remove", why, observed)
                return
            else:
                self._settle(run, "live: a heartbeat record changed just now", observed)
        else:
            run.entry["observed_seconds"] = round(observed, 3)
        self._clean(run, admin, state, tags, now)

    def _settle(self, run: _Watched, reason: str, observed: float) -> None:
        run.entry = self.verdict(run.summary, "keep", reason, observed)

    def _clean(
        self, run: _Watched, admin: RunAdmin, state: RendezvousState | None, tags: Mapping[str, str], now: float
    ) -> None:
        """Delete the records of the run's gone nodes (see the module's docstring)."""
        store, tracker = run.store, run.tracker
        members = set() if state is None else state.members()
        dead = tracker.dead(tags, now) - members
        owners = {name: request_owner(name) for name in store.list_records("req")}
        unbeating = [name for name, owner in owners.items() if owner not in members and owner not in tags]
        folded = admin.folded_requests(state, unbeating)
        if not self.args.dry_run and (dead or folded):
            # Last look right before deleting: a node whose heartbeat was written meanwhile keeps its records.
            latest = store.list_records("hb")
            dead = {n for n in dead if latest.get(n) == tags[n]}
            folded = [name for name in folded if owners[name] not in latest]
        gone: dict[str, dict[str, Any]] = {}
        for node_id in sorted(dead):
            gone[node_id] = {"node_id": node_id, "why": "dead", "heartbeat_record": True, "join_requests": 0}
        for name, owner in owners.items():
            if owner in dead or name in folded:
                empty = {"node_id": owner, "why": "removed", "heartbeat_record": False, "join_requests": 0}
                gone.setdefault(owner, empty)
                gone[owner]["join_requests"] += 1
        if not self.args.dry_run:
            admin.forget_records(dead)
            for name in folded:
                admin.discard_record("req", name)
        run.entry["gone_nodes"] = sorted(gone.values(), key=lambda g: g["node_id"])
        if gone:
            records = sum(g["heartbeat_record"] + g["join_requests"] for g in gone.values())
            why = {
                "dead": f"heartbeat unchanged for {human(tracker.timeout)}",
                "removed": "no heartbeat, request already folded",
            }
            shown = [f"{g['node_id']} ({why[g['why']]})" for g in run.entry["gone_nodes"][:_SHOWN]]
            more = f" and {len(gone) - _SHOWN} more" if len(gone) > _SHOWN else ""
            self._say(
                f"{self.verb} {records} record(s) of {len(gone)} gone node(s) in run {store.run_id}: "
                f"{', '.join(shown)}{more}"
            )

    def finish(self) -> None:
        removed = sum(r["verdict"] == "remove" for r in self.runs)
        kept = len(self.runs) - removed
        gone = [g for r in self.runs for g in r["gone_nodes"]]
        records = sum(g["heartbeat_record"] + g["join_requests"] for g in gone)
        if self.args.json:
            print_json(
                {
                    "schema": GC_SCHEMA,
                    "endpoint": self.endpoint,
                    "dry_run": bool(self.args.dry_run),
                    "older_than_seconds": self.args.older_than,
                    "window_seconds": self.args.window,
                    "runs": sorted(self.runs, key=lambda r: r["run_id"]),
                    "removed_runs": removed,
                    "kept_runs": kept,
                    "removed_records": records,
                }
            )
            return
        tail = f"; {self.verb} {records} record(s) of {len(gone)} gone node(s) in kept runs" if gone else ""
        sys.stdout.write(f"gc: {self.verb} {removed} run(s), kept {kept}{tail}\n")


def _stores(args: argparse.Namespace, endpoint: str) -> list[Store]:
    options, secret = args.storage_options, secret_of(args)
    run_ids = list_runs(endpoint, storage_options=dict(options)) if args.run_id is None else [args.run_id]
    stores = [open_store(endpoint, r, storage_options=dict(options), secret=secret) for r in run_ids]
    if args.run_id is not None and not run_exists(stores[0]):
        raise not_found(endpoint, args.run_id, options)
    return stores


def cmd_gc(args: argparse.Namespace) -> int:
    from .._status import run_summary

    endpoint = endpoint_of(args)
    sweep = _Sweep(args, endpoint)
    now = time.time()
    watched = [w for store in _stores(args, endpoint) if (w := sweep.watch(store, run_summary(store, now)))]
    for run in sorted(watched, key=lambda w: w.due):
        time.sleep(max(0.0, run.due - time.monotonic()))
        sweep.judge(run)
    sweep.finish()
    return EXIT_OK
