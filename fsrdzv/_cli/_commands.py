"""The commands that inspect and launch: ``status``, ``list``, ``doctor``, ``run``, ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence

from .._errors import RendezvousError
from .._liveness import LivenessTracker
from .._settings import Settings
from .._store import Store
from .._stores import list_runs, open_store, split_endpoint
from .._text import one_line
from ._context import endpoint_of, not_found, open_run, run_exists, run_id_of, secret_of
from ._exits import EXIT_FAILURE, EXIT_NO_COMMAND, EXIT_OK, EXIT_USAGE, CliError
from ._render import print_json, render_list, render_status
from ._values import parse_nnodes

__all__ = ["cmd_demo", "cmd_doctor", "cmd_list", "cmd_run", "cmd_status"]


def cmd_status(args: argparse.Namespace) -> int:
    from .._status import collect_status

    endpoint = endpoint_of(args)
    run_id = run_id_of(args, from_env=True)
    store = open_run(args, endpoint, run_id)
    observer = LivenessTracker.observer()
    if not run_exists(store):  # before the observation window (or the watch): a typo should not cost a wait
        raise not_found(endpoint, run_id, args.storage_options)
    if args.watch:
        return _watch(args, store, endpoint, observer)
    doc = collect_status(store, endpoint, observer=observer, observe=args.observe)
    if args.json:
        print_json(doc)
    else:
        sys.stdout.write(render_status(doc))
    return EXIT_OK


def _watch(args: argparse.Namespace, store: Store, endpoint: str, observer: LivenessTracker) -> int:
    from .._status import collect_status

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
                body = f"fsrdzv status: error: {one_line(exc, None) or 'unknown error'} (retrying)\n"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"\x1b[H\x1b[2J{stamp}  every {args.interval:g}s, Ctrl-C to stop\n\n" + body)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_OK
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_list(args: argparse.Namespace) -> int:
    from .._status import LIST_SCHEMA, run_summary

    endpoint = endpoint_of(args)
    options = args.storage_options
    secret = secret_of(args)
    now = time.time()
    runs = []
    for run_id in list_runs(endpoint, storage_options=dict(options)):
        store = open_store(endpoint, run_id, storage_options=dict(options), secret=secret)
        runs.append(run_summary(store, now))
    if args.json:
        print_json({"schema": LIST_SCHEMA, "endpoint": endpoint, "runs": runs})
        return EXIT_OK
    if not runs:
        sys.stdout.write(f"no runs at {endpoint}\n")
        return EXIT_OK
    sys.stdout.write(render_list(runs))
    for r in runs:
        if r["error"]:
            sys.stdout.write(f"{r['run_id']}: {one_line(r['error'], None)}\n")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from .._doctor import CHECKS, DOCTOR_SCHEMA, run_doctor

    endpoint = endpoint_of(args, check_directory=False)
    scheme, _ = split_endpoint(endpoint)
    results = run_doctor(
        endpoint,
        storage_options=args.storage_options,
        secret=secret_of(args),
        checks=args.check or list(CHECKS),
        writers=args.writers,
        rounds=args.rounds,
        samples=args.samples,
    )
    failed = [c for c in results if c.verdict == "fail"]
    warned = [c for c in results if c.verdict == "warn"]
    verdict = "FAIL" if failed else "OK"
    if args.json:
        checks = [c.to_json() for c in results]
        print_json({"schema": DOCTOR_SCHEMA, "endpoint": endpoint, "verdict": verdict.lower(), "checks": checks})
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


def _nnodes(args: argparse.Namespace) -> tuple[int, int]:
    if args.nnodes is not None:
        nnodes: tuple[int, int] = args.nnodes
        return nnodes
    slurm = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    if not slurm:
        raise CliError("no node count: give --nnodes MIN[:MAX] (or run under Slurm)", EXIT_USAGE)
    try:
        return parse_nnodes(slurm)
    except argparse.ArgumentTypeError as exc:
        raise CliError(f"SLURM_JOB_NUM_NODES: {exc}", EXIT_USAGE) from None


def cmd_run(args: argparse.Namespace) -> int:
    from .._launcher import LaunchConfig, Launcher

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("no command to run: put it after '--', e.g. fsrdzv run ... -- python train.py", EXIT_USAGE)
    endpoint = endpoint_of(args, check_directory=False, option="--endpoint")
    run_id = run_id_of(args, from_env=True)
    low, high = _nnodes(args)
    _check_command(cmd)
    settings = Settings.from_mapping(
        {
            "run_id": run_id,
            "min_nodes": low,
            "max_nodes": high,
            "join_timeout": args.join_timeout,
            "last_call_timeout": args.last_call_timeout,
            "close_timeout": args.close_timeout,
            "keep_alive_interval": args.keep_alive_interval,
            "keep_alive_max_attempt": args.keep_alive_max_attempt,
            "heartbeat_timeout": args.heartbeat_timeout,
        }
    )
    config = LaunchConfig(
        endpoint=endpoint,
        run_id=settings.run_id,
        min_nodes=settings.min_nodes,
        max_nodes=settings.max_nodes,
        cmd=cmd,
        max_restarts=args.max_restarts,
        local_addr=args.local_addr,
        storage_options=args.storage_options,
        secret=secret_of(args),
        join_timeout=settings.join_timeout,
        last_call_timeout=settings.last_call_timeout,
        close_timeout=settings.close_timeout,
        keep_alive_interval=settings.keep_alive_interval,
        keep_alive_max_attempt=settings.keep_alive_max_attempt,
        heartbeat_timeout=settings.heartbeat_timeout,
        monitor_interval=args.monitor_interval,
        stop_timeout=args.stop_timeout,
        watch_peers=args.watch_peers,
        nproc_per_node=args.nproc_per_node,
        scale_up_at=args.scale_up_at,
        scale_up_max_delay=args.scale_up_max_delay,
        secret_file=args.secret_file,
        expected_nodes=(args.expect,) if args.expect else (),
    )
    return Launcher(config).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from .._demo import run_demo

    return run_demo(nodes=args.nodes, keep=args.keep, verbose=args.verbose)
