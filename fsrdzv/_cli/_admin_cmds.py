"""The commands that change runs: ``close``, ``reset`` and ``gc``, all through :class:`fsrdzv._admin.RunAdmin`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .._admin import RunAdmin
from .._errors import RendezvousStateError, RendezvousTimeoutError
from .._liveness import LivenessTracker
from .._store import Store
from .._stores import list_runs, open_store
from .._text import one_line
from ._context import endpoint_of, not_found, open_run, run_exists, run_id_of, secret_of
from ._exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError
from ._render import human

__all__ = ["cmd_close", "cmd_gc", "cmd_reset"]


def cmd_close(args: argparse.Namespace) -> int:
    endpoint = endpoint_of(args)
    run_id = run_id_of(args, from_env=False)
    admin = RunAdmin(open_run(args, endpoint, run_id))
    try:
        result = admin.close(args.timeout, create=False)
    except RendezvousTimeoutError:
        raise CliError(
            f"could not close run {run_id!r} within {args.timeout:g}s: the document kept changing; retry",
            EXIT_FAILURE,
        ) from None
    if result.state is None:
        raise not_found(endpoint, run_id, args.storage_options)
    if result.already_closed:
        sys.stdout.write(f"run {run_id!r} is already closed (round {result.state.round})\n")
    else:
        sys.stdout.write(
            f"closed run {run_id!r} at round {result.state.round}: its nodes stop at their next check "
            "(RendezvousClosedError)\n"
        )
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    endpoint = endpoint_of(args)
    run_id = run_id_of(args, from_env=False)
    if not args.force:
        raise CliError(
            f"refusing to reset run {run_id!r} without --force: it replaces the document and deletes every record; "
            "nodes still running in it will fail. Inspect it first with 'fsrdzv status', then add --force",
            EXIT_USAGE,
        )
    store = open_run(args, endpoint, run_id)
    if not run_exists(store):
        raise not_found(endpoint, run_id, args.storage_options)
    result = RunAdmin(store).reset()
    if result.unreadable is not None:
        before = f"an unreadable document ({one_line(result.unreadable, None).split(';')[0]})"
    elif result.previous is None:
        before = "an empty run"
    else:
        before = f"round {result.previous.round}, generation {result.previous.generation}"
    sys.stdout.write(f"reset run {run_id!r}: replaced {before} with a fresh open document; records deleted\n")
    return EXIT_OK


class _Sweep:
    """One ``gc`` pass: the runs kept (with why) and the candidates for removal, then the verdict on each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.verb = "would remove" if args.dry_run else "removed"
        self.kept = 0
        self.removed = 0

    def keep(self, run_id: str, why: str) -> None:
        self.kept += 1
        sys.stdout.write(f"kept {run_id}: {why}\n")

    def is_candidate(self, store: Store, summary: dict[str, Any]) -> bool:
        """Whether the run may be removed if it shows no life; reports why it is kept otherwise."""
        idle, older_than = summary["idle_seconds"], self.args.older_than
        if summary["state"] == "corrupt":
            why = "unreadable document; inspect it with 'fsrdzv status' and replace it with 'fsrdzv reset --force'"
        elif summary["state"] == "error":
            why = f"storage error: {one_line(summary['error'], None)}"
        elif older_than > 0 and (idle is None or idle < older_than):
            why = f"idle {'unknown' if idle is None else human(idle)}, not older than {human(older_than)}"
        else:
            return True
        self.keep(store.run_id, why)
        return False

    def judge(self, store: Store, summary: dict[str, Any], tracker: LivenessTracker) -> None:
        """Remove the run unless a heartbeat record or its document changed while we watched."""
        from .._status import observe_heartbeats

        run_id, window = store.run_id, self.args.window
        tags = store.list_records("hb")
        now = time.monotonic()
        observe_heartbeats(tracker, tags, now)
        admin = RunAdmin(store)
        try:
            state = admin.read()
        except RendezvousStateError:
            self.keep(run_id, "the document became unreadable while watching")
            return
        live = set(tags) - tracker.dead(tags, now)
        if live:
            self.keep(run_id, f"live: {len(live)} heartbeat record(s) changed within {window:g}s")
            return
        if state is not None and state.generation != summary["generation"]:
            self.keep(run_id, f"live: its document changed within {window:g}s")
            return
        why = "closed" if summary["closed"] else "no heartbeat changed" if tags else "no node records"
        if not self.args.dry_run:
            # Last look right before deleting: a node that started meanwhile keeps its run.
            if store.list_records("hb") != tags:
                self.keep(run_id, "live: a heartbeat record changed just now")
                return
            admin.delete_run()
        self.removed += 1
        sys.stdout.write(f"{self.verb} {run_id}: {why}, idle {human(summary['idle_seconds'])}\n")


def cmd_gc(args: argparse.Namespace) -> int:
    from .._status import observe_heartbeats, run_summary

    endpoint = endpoint_of(args)
    options = args.storage_options
    secret = secret_of(args)
    sweep = _Sweep(args)
    now = time.time()
    candidates: list[tuple[Store, dict[str, Any], LivenessTracker]] = []
    for run_id in list_runs(endpoint, storage_options=dict(options)):
        store = open_store(endpoint, run_id, storage_options=dict(options), secret=secret)
        summary = run_summary(store, now)
        if sweep.is_candidate(store, summary):
            # Liveness the skew-free way: a heartbeat record that changes while we watch, on this host's clock. A
            # record unchanged for the whole window is dead; nothing the observer misses counts (max_gap inf).
            tracker = LivenessTracker(args.window, max_gap=float("inf"))
            observe_heartbeats(tracker, store.list_records("hb"), time.monotonic())
            candidates.append((store, summary, tracker))
    if candidates:
        time.sleep(args.window)
        for store, summary, tracker in candidates:
            sweep.judge(store, summary, tracker)
    sys.stdout.write(f"gc: {sweep.verb} {sweep.removed} run(s), kept {sweep.kept}\n")
    return EXIT_OK
