"""The ``fsrdzv`` command line: inspect and operate a rendezvous, launch any program elastically, and a demo.

Every command reports a problem as exactly one line on stderr, ``fsrdzv <command>: error: <cause>; <hint>``, and
exits with a documented status (:data:`EXIT_CODES`); ``--debug`` adds the traceback and debug logging. Nothing
here decides protocol questions: the commands read the document with the library's decoder, change it only
through the store's compare-and-set (``close``) or its explicit ``reset``, and judge liveness the skew-free way
(a record that changes, timed on this host's monotonic clock).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from . import _protocol as proto
from ._errors import (
    ConfigurationError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
    StateCorruptError,
)
from ._state import decode_state, encode_state
from ._status import LIST_SCHEMA, HeartbeatObserver, collect_status, read_state, run_summary
from ._store import Store
from ._stores import list_runs, open_store, split_endpoint

__all__ = ["EXIT_CODES", "CliError", "main"]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_STORAGE: Final = 3
EXIT_CORRUPT: Final = 4
EXIT_NOT_FOUND: Final = 5
EXIT_NO_COMMAND: Final = 127
EXIT_INTERRUPTED: Final = 130

#: The documented exit statuses (also in ``fsrdzv --help`` and docs/cli-json-schema.md).
EXIT_CODES: Final = {
    EXIT_OK: "success",
    EXIT_FAILURE: "failure: a doctor check failed, a join timed out, the run is closed, an internal error",
    EXIT_USAGE: "usage or configuration error: bad option or value, endpoint, run id; reset without --force",
    EXIT_STORAGE: "storage unreachable or failing: network, permissions, missing directory, disk full",
    EXIT_CORRUPT: "corrupt or incompatible state: unreadable document, newer schema, wrong HMAC",
    EXIT_NOT_FOUND: "no such run at the endpoint",
    EXIT_NO_COMMAND: "run: the command was not found or is not executable",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

_EPILOG_CODES = (
    "exit status:\n"
    + "".join(f"  {code:<4} {text}\n" for code, text in EXIT_CODES.items())
    + "  run  the command's own exit status (128+N if it died of signal N)\n"
)

_ENV_HELP = (
    "environment:\n"
    "  FSRDZV_ENDPOINT          default ENDPOINT (and run --endpoint)\n"
    "  FSRDZV_RUN_ID            default --run-id of status and run; then SLURM_JOB_ID\n"
    "  FSRDZV_STORAGE_OPTIONS   a JSON object of storage options (-o adds to and overrides it)\n"
    "  FSRDZV_SECRET_FILE       default --secret-file\n"
)

log = logging.getLogger("fsrdzv.cli")


class CliError(Exception):
    """A user-facing failure: one line, an exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the usage and then the error: two or more lines. One line, with where to look.
        raise CliError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


def _wrap(text: str, width: int = 100) -> str:
    """Wrap prose paragraphs for a raw-description help; lines that start with spaces are kept as they are."""
    out = []
    for line in text.split("\n"):
        out.append(line if line.startswith(" ") or not line else textwrap.fill(line, width))
    return "\n".join(out)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(110, shutil.get_terminal_size().columns))


# -- value parsing -------------------------------------------------------------------------------------------------

_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h|d|w)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"1.5m"``, ``"24h"``, ``"7d"``, ``"250ms"`` -> seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use seconds or a number with ms, s, m, h, d, w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be greater than zero")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value

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


def _set_nested(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            raise CliError(f"storage option {dotted!r}: {key!r} is already set to a plain value", EXIT_USAGE)
        target = child
    target[leaf] = value


def parse_storage_options(items: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge ``$FSRDZV_STORAGE_OPTIONS`` (a JSON object) with ``-o KEY=VALUE`` items.

    VALUE is JSON when it parses (``true``, ``2``, ``{"a": 1}``), else a string; dotted keys nest
    (``client_kwargs.region_name=us-east-1``).
    """
    environ = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    raw = environ.get("FSRDZV_STORAGE_OPTIONS", "").strip()
    if raw:
        try:
            loaded = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CliError(
                f"FSRDZV_STORAGE_OPTIONS is not valid JSON ({exc.msg}); use a JSON object", EXIT_USAGE
            ) from None
        if not isinstance(loaded, dict):
            raise CliError('FSRDZV_STORAGE_OPTIONS must be a JSON object, e.g. {"lock": false}', EXIT_USAGE)
        options.update(loaded)
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
        _set_nested(options, key, value)
    return options


# -- shared helpers ------------------------------------------------------------------------------------------------


def _secret(args: argparse.Namespace) -> bytes | None:
    path = getattr(args, "secret_file", None)
    if not path:
        return None
    from ._handler import read_secret_file

    return read_secret_file(path)


def _endpoint(args: argparse.Namespace) -> str:
    endpoint: str | None = getattr(args, "endpoint", None) or os.environ.get("FSRDZV_ENDPOINT")
    if not endpoint:
        raise CliError(
            "no endpoint: give ENDPOINT (a shared directory or s3://, az://, gs:// URL) or set FSRDZV_ENDPOINT",
            EXIT_USAGE,
        )
    scheme, rest = split_endpoint(endpoint)
    if scheme == "file" and not os.path.isdir(os.path.expanduser(rest)):
        raise CliError(
            f"endpoint directory {rest} does not exist; check the path, and that the shared file system is mounted "
            "on this node",
            EXIT_STORAGE,
        )
    return endpoint


def _run_id(args: argparse.Namespace, *, from_env: bool) -> str:
    run_id: str | None = args.run_id
    if not run_id and from_env:
        run_id = os.environ.get("FSRDZV_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if not run_id:
        hint = " (or set FSRDZV_RUN_ID / SLURM_JOB_ID)" if from_env else ""
        raise CliError(f"no run id: give --run-id ID{hint}", EXIT_USAGE)
    return run_id


def _open(args: argparse.Namespace, endpoint: str, run_id: str) -> Store:
    return open_store(endpoint, run_id, storage_options=args.storage_options, secret=_secret(args))


def _not_found(endpoint: str, run_id: str, options: Mapping[str, Any]) -> CliError:
    try:
        runs = list_runs(endpoint, storage_options=dict(options))
    except RendezvousError:
        runs = []
    if runs:
        shown = ", ".join(runs[:8]) + (f" and {len(runs) - 8} more" if len(runs) > 8 else "")
        hint = f"runs there: {shown}"
    else:
        hint = "there are no runs there; check the endpoint"
    return CliError(f"no run {run_id!r} at {endpoint}; {hint}", EXIT_NOT_FOUND)


def _run_exists(store: Store) -> bool:
    try:
        if store.read() is not None:
            return True
    except StateCorruptError:
        return True
    return bool(store.list_records("hb") or store.list_records("req"))


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


# -- status --------------------------------------------------------------------------------------------------------


def _heartbeat_text(hb: Mapping[str, Any]) -> str:
    if not hb["present"]:
        return "missing"
    age = _human(hb["age_seconds"])
    return f">={age}" if hb["age_is_lower_bound"] else age


def render_status(doc: Mapping[str, Any]) -> str:
    """The human-readable form of an ``fsrdzv.status/1`` object."""
    head = f"run {doc['run_id']!r} at {doc['endpoint']}"
    if not doc["exists"]:
        lines = [head, "  no document yet (a node is creating it, or the run was reset)"]
    else:
        phase = "complete" if doc["complete"] else "forming"
        if not doc["complete"] and doc["last_call"] is not None:
            phase += f" (last call since generation {doc['last_call']})"
        parts = [
            f"round {doc['round']}",
            phase,
            "CLOSED" if doc["closed"] else "open",
            f"generation {doc['generation']}",
        ]
        if doc["master"]:
            parts.append(f"master {doc['master']['addr']}:{doc['master']['port']}")
        lines = [head, "  " + " | ".join(parts)]
    lines.append(
        "  heartbeat = seconds since this observer saw the node's record change "
        f"(watched {doc['observed_seconds']:.1f}s; '>=': unchanged while watched)"
    )

    def section(title: str, nodes: Sequence[Mapping[str, Any]], ranked: bool) -> None:
        lines.append("")
        if not nodes:
            lines.append(f"{title} (0): none")
            return
        lines.append(f"{title} ({len(nodes)})")
        headers = (["RANK"] if ranked else []) + ["ADDRESS", "HOST", "PID", "HEARTBEAT", "NODE ID"]
        rows = []
        for n in nodes:
            row = [] if not ranked else ["-" if n.get("rank") is None else str(n["rank"])]
            row += [str(n.get("addr") or "?"), str(n.get("host") or "?"), str(n.get("pid") or "?")]
            row += [_heartbeat_text(n["heartbeat"]), n["node_id"]]
            rows.append(row)
        lines.append(_table(headers, rows))

    section("participants", doc["participants"], ranked=True)
    section("waiting", doc["waiting"], ranked=False)
    section("spares", doc["spares"], ranked=False)
    if doc["unlisted"]:
        lines.append("")
        lines.append(f"not in the document ({len(doc['unlisted'])}): joining, or records left by nodes that are gone")
        rows = [
            [_heartbeat_text(n["heartbeat"]), "yes" if n["join_request"] else "no", n["node_id"]]
            for n in doc["unlisted"]
        ]
        lines.append(_table(["HEARTBEAT", "JOIN REQUEST", "NODE ID"], rows))
    return "\n".join(lines) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    endpoint = _endpoint(args)
    run_id = _run_id(args, from_env=True)
    store = _open(args, endpoint, run_id)
    observer = HeartbeatObserver()
    if args.watch:
        return _watch(args, store, endpoint, observer)
    if not _run_exists(store):  # before the observation window: a typo should not cost a wait
        raise _not_found(endpoint, run_id, args.storage_options)
    doc = collect_status(store, endpoint, observer=observer, observe=args.observe)
    if args.json:
        _print_json(doc)
    else:
        sys.stdout.write(render_status(doc))
    return EXIT_OK


def _watch(args: argparse.Namespace, store: Store, endpoint: str, observer: HeartbeatObserver) -> int:
    # Shells start background jobs with SIGINT ignored, and Python then keeps it ignored: --watch must still end
    # on Ctrl-C / kill -INT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            try:
                # The observer lives across refreshes: after its first look, ages need no extra wait.
                doc = collect_status(store, endpoint, observer=observer, observe=0.0)
                body = json.dumps(doc, indent=2) + "\n" if args.json else render_status(doc)
            except (RendezvousError, OSError) as exc:
                body = f"fsrdzv status: error: {_one_line(str(exc))} (retrying)\n"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"\x1b[H\x1b[2J{stamp}  every {args.interval:g}s, Ctrl-C to stop\n\n" + body)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_OK
    finally:
        signal.signal(signal.SIGINT, previous)


# -- list ----------------------------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    endpoint = _endpoint(args)
    options = args.storage_options
    secret = _secret(args)
    now = time.time()
    runs = []
    for run_id in list_runs(endpoint, storage_options=dict(options)):
        store = open_store(endpoint, run_id, storage_options=dict(options), secret=secret)
        runs.append(run_summary(store, endpoint, options, now))
    if args.json:
        _print_json({"schema": LIST_SCHEMA, "endpoint": endpoint, "runs": runs})
        return EXIT_OK
    if not runs:
        sys.stdout.write(f"no runs at {endpoint}\n")
        return EXIT_OK
    rows = [
        [
            r["run_id"],
            r["state"],
            "-" if r["round"] is None else str(r["round"]),
            str(r["participants"]),
            str(r["waiting"]),
            str(r["spares"]),
            str(r["heartbeat_records"]),
            _human(r["idle_seconds"]),
        ]
        for r in runs
    ]
    sys.stdout.write(
        _table(["RUN ID", "STATE", "ROUND", "PARTICIPANTS", "WAITING", "SPARES", "HEARTBEATS", "IDLE"], rows, "") + "\n"
    )
    for r in runs:
        if r["error"]:
            sys.stdout.write(f"{r['run_id']}: {_one_line(r['error'])}\n")
    return EXIT_OK


# -- close ---------------------------------------------------------------------------------------------------------


def cmd_close(args: argparse.Namespace) -> int:
    endpoint = _endpoint(args)
    run_id = _run_id(args, from_env=False)
    store = _open(args, endpoint, run_id)
    deadline = time.monotonic() + args.timeout
    delay = 0.05
    while True:
        snap = store.read()
        if snap is None:
            raise _not_found(endpoint, run_id, args.storage_options)
        state = decode_state(snap.data, store.describe("document"))
        if state.closed:
            sys.stdout.write(f"run {run_id!r} is already closed (round {state.round})\n")
            return EXIT_OK
        if store.compare_and_set(encode_state(proto.close(state)), snap.token).won:
            sys.stdout.write(
                f"closed run {run_id!r} at round {state.round}: its nodes stop at their next check "
                "(RendezvousClosedError)\n"
            )
            return EXIT_OK
        if time.monotonic() > deadline:
            raise CliError(
                f"could not close run {run_id!r} within {args.timeout:g}s: the document kept changing; retry",
                EXIT_FAILURE,
            )
        # Lost a race with a node's write: read again and retry, with a little jitter.
        time.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
        delay = min(1.0, delay * 2)


# -- reset ---------------------------------------------------------------------------------------------------------


def cmd_reset(args: argparse.Namespace) -> int:
    endpoint = _endpoint(args)
    run_id = _run_id(args, from_env=False)
    if not args.force:
        raise CliError(
            f"refusing to reset run {run_id!r} without --force: it replaces the document and deletes every record; "
            "nodes still running in it will fail. Inspect it first with 'fsrdzv status', then add --force",
            EXIT_USAGE,
        )
    store = _open(args, endpoint, run_id)
    if not _run_exists(store):
        raise _not_found(endpoint, run_id, args.storage_options)
    generation = 0
    try:
        old = read_state(store)
        before = "an empty run" if old is None else f"round {old.round}, generation {old.generation}"
        if old is not None:
            generation = old.generation + 1
    except RendezvousStateError as exc:
        before = f"an unreadable document ({_one_line(str(exc)).split(';')[0]})"
    fresh = proto.new_state(run_id, secrets.token_hex(8), generation)
    store.reset(encode_state(fresh))
    sys.stdout.write(f"reset run {run_id!r}: replaced {before} with a fresh open document; records deleted\n")
    return EXIT_OK


# -- gc ------------------------------------------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
    endpoint = _endpoint(args)
    options = args.storage_options
    secret = _secret(args)
    verb = "would remove" if args.dry_run else "removed"
    now = time.time()
    candidates: list[tuple[Store, dict[str, Any]]] = []
    kept = removed = 0

    def keep(run_id: str, why: str) -> None:
        nonlocal kept
        kept += 1
        sys.stdout.write(f"kept {run_id}: {why}\n")

    for run_id in list_runs(endpoint, storage_options=dict(options)):
        store = open_store(endpoint, run_id, storage_options=dict(options), secret=secret)
        summary = run_summary(store, endpoint, options, now)
        if summary["state"] == "corrupt":
            keep(
                run_id,
                "unreadable document; inspect it with 'fsrdzv status' and replace it with 'fsrdzv reset --force'",
            )
        elif summary["state"] == "error":
            keep(run_id, f"storage error: {_one_line(summary['error'])}")
        elif args.older_than > 0 and (summary["idle_seconds"] is None or summary["idle_seconds"] < args.older_than):
            idle = "unknown" if summary["idle_seconds"] is None else _human(summary["idle_seconds"])
            keep(run_id, f"idle {idle}, not older than {_human(args.older_than)}")
        else:
            candidates.append((store, summary))
    if candidates:
        # Liveness the skew-free way: a heartbeat record that changes while we watch, on this host's clock.
        first = {store.run_id: store.list_records("hb") for store, _ in candidates}
        time.sleep(args.window)
        for store, summary in candidates:
            run_id = store.run_id
            tags = store.list_records("hb")
            changed = [n for n, t in tags.items() if first[run_id].get(n) != t]
            try:
                state = read_state(store)
            except RendezvousStateError:
                keep(run_id, "the document became unreadable while watching")
                continue
            if changed:
                keep(run_id, f"live: {len(changed)} heartbeat record(s) changed within {args.window:g}s")
                continue
            if state is not None and state.generation != summary["generation"]:
                keep(run_id, f"live: its document changed within {args.window:g}s")
                continue
            why = "closed" if summary["closed"] else "no heartbeat changed" if tags else "no node records"
            if not args.dry_run:
                # Last look right before deleting: a node that started meanwhile keeps its run.
                if store.list_records("hb") != tags:
                    keep(run_id, "live: a heartbeat record changed just now")
                    continue
                store.delete_run()
            removed += 1
            sys.stdout.write(f"{verb} {run_id}: {why}, idle {_human(summary['idle_seconds'])}\n")
    sys.stdout.write(f"gc: {verb} {removed} run(s), kept {kept}\n")
    return EXIT_OK


# -- doctor --------------------------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import CHECKS, DOCTOR_SCHEMA, run_doctor

    endpoint = args.endpoint or os.environ.get("FSRDZV_ENDPOINT")
    if not endpoint:
        raise CliError(
            "no endpoint: give ENDPOINT (a shared directory or object-store URL) or set FSRDZV_ENDPOINT", EXIT_USAGE
        )
    scheme, _ = split_endpoint(endpoint)
    selected = args.check or list(CHECKS)
    results = run_doctor(
        endpoint,
        storage_options=args.storage_options,
        secret=_secret(args),
        checks=selected,
        mountinfo=args.mountinfo,
        writers=args.writers,
        rounds=args.rounds,
        samples=args.samples,
    )
    failed = [c for c in results if c.verdict == "fail"]
    warned = [c for c in results if c.verdict == "warn"]
    verdict = "FAIL" if failed else "OK"
    if args.json:
        _print_json(
            {
                "schema": DOCTOR_SCHEMA,
                "endpoint": endpoint,
                "verdict": verdict.lower(),
                "checks": [c.to_json() for c in results],
            }
        )
    else:
        sys.stdout.write(f"fsrdzv doctor {endpoint} ({scheme})\n")
        for c in results:
            sys.stdout.write(f"  {c.verdict.upper():<5} {c.name:<8} {c.summary}\n")
        passed = sum(c.verdict == "pass" for c in results)
        skipped = sum(c.verdict == "skip" for c in results)
        sys.stdout.write(
            f"verdict: {verdict} ({passed} passed, {len(warned)} warned, {len(failed)} failed, {skipped} skipped)\n"
        )
    return EXIT_FAILURE if failed else EXIT_OK


# -- run -----------------------------------------------------------------------------------------------------------


def _check_command(cmd: Sequence[str]) -> None:
    program = cmd[0]
    if os.sep in program:
        ok = os.path.isfile(program) and os.access(program, os.X_OK)
    else:
        ok = shutil.which(program) is not None
    if not ok:
        raise CliError(
            f"command not found or not executable: {program!r}; check the command after '--'", EXIT_NO_COMMAND
        )


def cmd_run(args: argparse.Namespace) -> int:
    from ._launcher import LaunchConfig, Launcher

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("no command to run: put it after '--', e.g. fsrdzv run ... -- python train.py", EXIT_USAGE)
    endpoint = args.endpoint or os.environ.get("FSRDZV_ENDPOINT")
    if not endpoint:
        raise CliError(
            "no endpoint: give --endpoint (a shared directory or object-store URL) or set FSRDZV_ENDPOINT", EXIT_USAGE
        )
    run_id = _run_id(args, from_env=True)
    nnodes = args.nnodes
    if nnodes is None:
        slurm = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
        if not slurm:
            raise CliError("no node count: give --nnodes MIN[:MAX] (or run under Slurm)", EXIT_USAGE)
        try:
            nnodes = parse_nnodes(slurm)
        except argparse.ArgumentTypeError as exc:
            raise CliError(f"SLURM_JOB_NUM_NODES: {exc}", EXIT_USAGE) from None
    _check_command(cmd)
    config = LaunchConfig(
        endpoint=endpoint,
        run_id=run_id,
        min_nodes=nnodes[0],
        max_nodes=nnodes[1],
        cmd=cmd,
        max_restarts=args.max_restarts,
        local_addr=args.local_addr,
        storage_options=args.storage_options,
        secret=_secret(args),
        join_timeout=args.join_timeout,
        last_call_timeout=args.last_call_timeout,
        close_timeout=args.close_timeout,
        keep_alive_interval=args.keep_alive_interval,
        keep_alive_max_attempt=args.keep_alive_max_attempt,
        heartbeat_timeout=args.heartbeat_timeout,
        monitor_interval=args.monitor_interval,
        stop_timeout=args.stop_timeout,
        watch_peers=args.watch_peers,
    )
    return Launcher(config).run()


# -- demo ----------------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(nodes=args.nodes, keep=args.keep, verbose=args.verbose)


# -- the parser ----------------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, store: bool = True) -> None:
    group = parser.add_argument_group("common options")
    if store:
        group.add_argument(
            "-o",
            "--storage-option",
            dest="storage_option",
            action="append",
            metavar="KEY=VALUE",
            help="storage option, repeatable; VALUE is JSON if it parses (lock=false, lock_timeout=2), dotted keys "
            "nest (client_kwargs.region_name=us-east-1); added to $FSRDZV_STORAGE_OPTIONS",
        )
        group.add_argument(
            "--secret-file",
            default=os.environ.get("FSRDZV_SECRET_FILE"),
            metavar="PATH",
            help="job secret for HMAC-signed documents and records (default: $FSRDZV_SECRET_FILE)",
        )
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks and debug logs")


def _endpoint_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "endpoint",
        metavar="ENDPOINT",
        nargs="?",
        help="a shared directory (/shared/rdzv, file://...) or s3://bucket/prefix, az://container/prefix, "
        "gs://bucket/prefix (default: $FSRDZV_ENDPOINT)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsrdzv",
        formatter_class=_Formatter,
        description="Elastic rendezvous on shared storage: inspect and operate runs, launch any program "
        "elastically, try it out with a demo.",
        epilog=_EPILOG_CODES + "\n" + _ENV_HELP + "\nrun 'fsrdzv COMMAND --help' for the options of a command.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fsrdzv {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_text: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=_wrap(description),
            epilog=(epilog + "\n\n" if epilog else "") + _EPILOG_CODES,
            formatter_class=_Formatter,
        )
        return p

    p = add(
        "status",
        "show one run: round, participants with rank and heartbeat age, waiting nodes, spares",
        "Show the state of one run: round, complete/closed, generation, participants with rank, address and "
        "heartbeat age, waiting nodes and spares.\n\nHeartbeat ages are seconds since THIS observer saw each "
        "node's record change, on this host's monotonic clock: no remote clock is trusted. A one-shot status "
        "therefore watches the records for --observe seconds first; '>=' marks a record that did not change "
        "while watched (its true age is at least that).",
        "examples:\n  fsrdzv status /shared/rdzv --run-id 1234\n  fsrdzv status s3://bucket/rdzv --run-id 1234 --json\n"
        "  fsrdzv status /shared/rdzv --run-id 1234 --watch\n\nJSON schema: fsrdzv.status/1 (docs/cli-json-schema.md)",
    )
    _endpoint_arg(p)
    p.add_argument("--run-id", metavar="ID", help="the run (default: $FSRDZV_RUN_ID, then $SLURM_JOB_ID)")
    p.add_argument("--json", action="store_true", help="print the fsrdzv.status/1 JSON object")
    p.add_argument("--watch", action="store_true", help="refresh in place (ANSI clear) until Ctrl-C")
    p.add_argument(
        "--interval",
        type=_positive_duration,
        default=1.0,
        metavar="DURATION",
        help="--watch refresh period (default: 1s)",
    )
    p.add_argument(
        "--observe",
        type=parse_duration,
        default=1.0,
        metavar="DURATION",
        help="how long a one-shot status watches the heartbeat records (default: 1s; 0: no ages)",
    )
    _common(p)
    p.set_defaults(func=cmd_status)

    p = add(
        "list",
        "list the runs at an endpoint with their state and idle age",
        "List the runs stored at an endpoint: state (forming, running, closed, corrupt, empty), round, node counts, "
        "heartbeat records, and idle age.\n\nThe idle age is this host's wall clock minus the newest modification "
        "time the storage reports for the run's objects: coarse, and off by the clock offset that 'fsrdzv doctor' "
        "measures.",
        "JSON schema: fsrdzv.list/1 (docs/cli-json-schema.md)",
    )
    _endpoint_arg(p)
    p.add_argument("--json", action="store_true", help="print the fsrdzv.list/1 JSON object")
    _common(p)
    p.set_defaults(func=cmd_list)

    p = add(
        "close",
        "close a run: its nodes stop (RendezvousClosedError)",
        "Close a run with one compare-and-set: every node sees RendezvousClosedError at its next check, and spares "
        "exit normally. Closing is idempotent. A run id whose nodes are all gone can be used again by a new job.",
    )
    _endpoint_arg(p)
    p.add_argument("--run-id", metavar="ID", help="the run to close (required)")
    p.add_argument(
        "--timeout", type=_positive_duration, default=30.0, metavar="DURATION", help="give up after (default: 30s)"
    )
    _common(p)
    p.set_defaults(func=cmd_close)

    p = add(
        "gc",
        "remove runs that are closed or whose nodes are all gone; never a live run",
        "Remove runs that are closed or whose nodes are all gone. A run is live, and kept, if any of its heartbeat "
        "records changes during the observation --window (timed on this host's monotonic clock) or its document "
        "changes; the window must exceed the runs' keep_alive_interval (default 5s). Runs with an unreadable "
        "document are kept (use 'fsrdzv reset --force').",
        "examples:\n  fsrdzv gc /shared/rdzv --dry-run\n  fsrdzv gc s3://bucket/rdzv --older-than 7d",
    )
    _endpoint_arg(p)
    p.add_argument(
        "--older-than",
        type=parse_duration,
        default=86400.0,
        metavar="DURATION",
        help="only runs idle at least this long by storage time (default: 24h; 0: any age)",
    )
    p.add_argument(
        "--window",
        type=_positive_duration,
        default=15.0,
        metavar="DURATION",
        help="liveness observation window (default: 15s)",
    )
    p.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    _common(p)
    p.set_defaults(func=cmd_gc)

    p = add(
        "reset",
        "replace a run's document (the only fix for an unreadable one); needs --force",
        "Replace a run's document with a fresh, open, empty one and delete all its records, whatever the document "
        "holds. This is the only way to replace an unreadable document: fsrdzv itself never overwrites one. Nodes "
        "still running in the run will fail, so stop them first.",
    )
    _endpoint_arg(p)
    p.add_argument("--run-id", metavar="ID", help="the run to reset (required)")
    p.add_argument("--force", action="store_true", help="really do it")
    _common(p)
    p.set_defaults(func=cmd_reset)

    from ._doctor import CHECKS

    p = add(
        "doctor",
        "check that an endpoint gives real CAS, working locks, safe mount options, a sane clock",
        "Check an endpoint with a scratch run (removed afterwards), one verdict per check:\n"
        "  reach    create, read and delete data\n"
        "  cas      racing conditional writes: exactly one winner; stale tokens refused\n"
        "  lock     (directories) a lock held by another process excludes this one\n"
        "  mount    (directories) mount options that break locking or caching (NFS nolock/local_lock/nocto,\n"
        "           actimeo/noac/lookupcache, Lustre localflock/noflock, FUSE), from /proc/self/mountinfo\n"
        "  clock    offset between this host's clock and the storage's (file mtime / object LastModified)\n"
        "  latency  median and p90 of read, CAS and listing\n"
        "A failed check makes the exit status 1; warnings do not.",
        "JSON schema: fsrdzv.doctor/1 (docs/cli-json-schema.md)",
    )
    _endpoint_arg(p)
    p.add_argument(
        "--check",
        action="append",
        choices=CHECKS,
        metavar="NAME",
        help=f"run only these checks, repeatable ({', '.join(CHECKS)})",
    )
    p.add_argument("--json", action="store_true", help="print the fsrdzv.doctor/1 JSON object")
    p.add_argument(
        "--writers", type=_count(2), default=2, metavar="N", help="racing writers in the CAS check (default: 2)"
    )
    p.add_argument(
        "--rounds", type=_count(1), default=5, metavar="N", help="update races in the CAS check (default: 5)"
    )
    p.add_argument(
        "--samples", type=_count(1), default=10, metavar="N", help="latency samples per operation (default: 10)"
    )
    p.add_argument("--mountinfo", help=argparse.SUPPRESS)  # test hook: a recorded mountinfo file
    _common(p)
    p.set_defaults(func=cmd_doctor)

    p = add(
        "run",
        "elastic launcher: join, run CMD with RANK/WORLD_SIZE/MASTER_ADDR..., re-form on changes",
        "Run CMD elastically on this node. The launcher joins the rendezvous, runs CMD with\n"
        "  RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, FSRDZV_ROUND, FSRDZV_RUN_ID\n"
        "  (and GROUP_RANK, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, FSRDZV_RESTART_COUNT, FSRDZV_MAX_RESTARTS,\n"
        "  FSRDZV_NODE_ID) set, keeps heartbeating, and watches the run. When a node waits to join or a\n"
        "  participant stops heartbeating, it stops CMD (SIGTERM to its process group, SIGKILL after\n"
        "  --stop-timeout) and re-forms; that is free. When CMD fails it re-forms too, up to --max-restarts\n"
        "  times. When CMD succeeds it closes the run. SIGTERM/SIGINT are forwarded to CMD; the launcher then\n"
        "  exits with CMD's status and leaves the run open for the other nodes.",
        "examples:\n"
        "  srun fsrdzv run --endpoint /shared/rdzv --nnodes 2:4 --max-restarts 3 -- python train.py\n"
        "  FSRDZV_ENDPOINT=s3://bucket/rdzv fsrdzv run --run-id job7 --nnodes 4 -- ./train.sh --epochs 10\n\n"
        "defaults under Slurm: --run-id from SLURM_JOB_ID, --nnodes from SLURM_JOB_NUM_NODES.",
    )
    p.add_argument(
        "--endpoint", metavar="ENDPOINT", help="shared directory or object-store URL (default: $FSRDZV_ENDPOINT)"
    )
    p.add_argument("--run-id", metavar="ID", help="the run (default: $FSRDZV_RUN_ID, then $SLURM_JOB_ID)")
    p.add_argument(
        "--nnodes", type=parse_nnodes, metavar="MIN[:MAX]", help="node count (default: $SLURM_JOB_NUM_NODES)"
    )
    p.add_argument(
        "--max-restarts", type=_count(0), default=0, metavar="K", help="restarts after CMD failures (default: 0)"
    )
    p.add_argument(
        "--local-addr",
        metavar="ADDR",
        help="address other nodes reach this one at; MASTER_ADDR when rank 0 (default: FQDN)",
    )
    timing = p.add_argument_group("timing (seconds, or durations like 500ms, 2m)")
    timing.add_argument(
        "--join-timeout",
        type=_positive_duration,
        default=600.0,
        metavar="T",
        help="a join must finish within (default: 600)",
    )
    timing.add_argument(
        "--last-call-timeout",
        type=_positive_duration,
        default=30.0,
        metavar="T",
        help="wait for more nodes once MIN joined (default: 30)",
    )
    timing.add_argument(
        "--close-timeout",
        type=_positive_duration,
        default=30.0,
        metavar="T",
        help="closing the run must finish within (default: 30)",
    )
    timing.add_argument(
        "--keep-alive-interval", type=_positive_duration, default=5.0, metavar="T", help="heartbeat period (default: 5)"
    )
    timing.add_argument(
        "--keep-alive-max-attempt",
        type=_count(1),
        default=3,
        metavar="N",
        help="missed heartbeats before a node is dead (default: 3)",
    )
    timing.add_argument(
        "--heartbeat-timeout",
        type=_positive_duration,
        default=5.0,
        metavar="T",
        help="one heartbeat write (default: 5)",
    )
    timing.add_argument(
        "--monitor-interval",
        type=_positive_duration,
        default=1.0,
        metavar="T",
        help="membership check period while CMD runs (default: 1)",
    )
    timing.add_argument(
        "--stop-timeout",
        type=_positive_duration,
        default=10.0,
        metavar="T",
        help="SIGTERM to SIGKILL grace when stopping CMD (default: 10)",
    )
    p.add_argument(
        "--watch-peers",
        type=_count(0),
        default=2,
        metavar="N",
        help="peers whose heartbeats each node reads (ring; 0: all; default: 2)",
    )
    p.add_argument("--quiet", action="store_true", help="log only warnings and errors of the launcher")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command and its arguments")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = add(
        "demo",
        "watch an elastic job on a temporary directory: formation, a node killed, a node added",
        "Start local nodes ('fsrdzv run' processes running a tiny Python program) on a temporary directory, "
        "then show, as a timeline with timings: the first round forming, one node killed with SIGKILL and the "
        "others re-forming, one node added and the job scaling up, and the job finishing. Cleans up after "
        "itself; takes a few seconds.",
    )
    p.add_argument("--nodes", type=_count(2), default=4, metavar="N", help="nodes to start with (default: 4)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    p.add_argument("--verbose", action="store_true", help="also show the launchers' own log lines")
    _common(p, store=False)
    p.set_defaults(func=cmd_demo)
    return parser


# -- main ----------------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip()) or "unknown error"


def exit_code_for(exc: BaseException) -> int:
    """The documented exit status for an exception."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, RendezvousConnectionError):
        return EXIT_STORAGE
    if isinstance(exc, RendezvousStateError):
        return EXIT_CORRUPT
    if isinstance(exc, RendezvousError):
        return EXIT_FAILURE
    if isinstance(exc, OSError):
        return EXIT_STORAGE  # an SDK error that escaped its store's translation: almost always the storage
    return EXIT_FAILURE


def _setup_logging(command: str | None, debug: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger("fsrdzv")
    root.handlers[:] = [handler]
    root.propagate = False
    if debug:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.setLevel(logging.DEBUG)
        return
    if command == "run":
        handler.setFormatter(logging.Formatter("%(asctime)s fsrdzv run: %(message)s", "%H:%M:%S"))
        root.setLevel(logging.WARNING)
        logging.getLogger("fsrdzv.run").setLevel(logging.WARNING if quiet else logging.INFO)
    else:
        # The inspection commands speak through their output and one-line errors; library warnings would
        # add lines that scripts do not expect.
        handler.setFormatter(logging.Formatter("fsrdzv: %(message)s"))
        root.setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fsrdzv`` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command: str | None = None
    debug = "--debug" in args_list[: args_list.index("--")] if "--" in args_list else "--debug" in args_list
    try:
        args = parser.parse_args(args_list)
        command = args.command
        debug = bool(getattr(args, "debug", False))
        if command is None:
            parser.print_help()
            return EXIT_USAGE
        _setup_logging(command, debug, bool(getattr(args, "quiet", False)))
        if hasattr(args, "storage_option"):
            args.storage_options = parse_storage_options(args.storage_option)
        code: int = args.func(args)
        return code
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except BaseException as exc:  # noqa: BLE001 - the one place that turns every failure into one line
        code = exit_code_for(exc)
        if isinstance(exc, KeyboardInterrupt):
            message = "interrupted"
        elif isinstance(exc, (CliError, RendezvousError)):
            # StorageError is an OSError too: print its message without the "[Errno N]" prefix.
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            message = _one_line(text)
        elif isinstance(exc, OSError):
            message = f"storage or system error: {_one_line(str(exc))}; check the endpoint and your credentials"
        else:
            message = (
                f"internal error: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug; please report it)"
            )
        if debug:
            traceback.print_exc()
        prog = f"fsrdzv {command}" if command else "fsrdzv"
        with contextlib.suppress(OSError):
            sys.stderr.write(f"{prog}: error: {message}\n")
            sys.stderr.flush()
        return code
