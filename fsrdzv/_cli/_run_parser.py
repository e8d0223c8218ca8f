"""The options of ``fsrdzv run`` (the launcher), apart from the other commands' parser to keep both small."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .._scaleup import DEFAULT_MAX_DELAY, SCALE_UP_AT
from .._settings import DEFAULTS, LAUNCH_DEFAULTS
from ._commands import cmd_run
from ._values import count, parse_duration, parse_nnodes, positive_duration

__all__ = ["add_run"]


def add_run(add: Callable[..., argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``fsrdzv run`` through ``add`` (the parser's sub-command factory); ``common`` adds the shared options."""
    p = add(
        "run",
        "elastic launcher: join, run CMD with RANK/WORLD_SIZE/MASTER_ADDR..., re-form on changes",
        "Run CMD elastically on this node. The launcher joins the rendezvous, runs --nproc-per-node copies\n"
        "  of CMD with torchrun's worker environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,\n"
        "  GROUP_RANK, GROUP_WORLD_SIZE, ROLE_*, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_*) and fsrdzv's\n"
        "  (FSRDZV_ROUND, FSRDZV_RUN_ID, FSRDZV_ENDPOINT, FSRDZV_RESTART_COUNT, FSRDZV_MAX_RESTARTS,\n"
        "  FSRDZV_NODE_ID), keeps heartbeating, and watches the run. When a node waits to join or a\n"
        "  participant stops heartbeating, it stops CMD (SIGTERM to its process groups, SIGKILL after\n"
        "  --stop-timeout) and re-forms; that is free. With --scale-up-at safe_point a waiting node is held\n"
        "  back until every node's CMD called fsrdzv.safe_point() (or --scale-up-max-delay passed). When CMD\n"
        "  fails (one of its copies) it re-forms too, up to --max-restarts times. When CMD succeeds it closes\n"
        "  the run. SIGTERM/SIGINT are forwarded to CMD; the launcher then exits with CMD's status and leaves\n"
        "  the run open for the other nodes.",
        "examples:\n"
        "  srun fsrdzv run --endpoint /shared/rdzv --nnodes 2:4 --max-restarts 3 -- python train.py\n"
        "  FSRDZV_ENDPOINT=s3://bucket/rdzv fsrdzv run --run-id job7 --nnodes 4 -- ./train.sh --epochs 10\n"
        "  fsrdzv run --endpoint /shared/rdzv --nnodes 2:8 --nproc-per-node 4 --scale-up-at safe_point "
        "-- python train.py\n\n"
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
        "--max-restarts", type=count(0), default=0, metavar="K", help="restarts after CMD failures (default: 0)"
    )
    p.add_argument(
        "--local-addr",
        metavar="ADDR",
        help="address other nodes reach this one at; MASTER_ADDR when rank 0 (default: the first of this node's "
        "host name and interface addresses that the others reach)",
    )
    p.add_argument(
        "--expect",
        metavar="NODES",
        help="host names the job expects, comma-separated, Slurm's node[01-03] allowed (default: "
        "$SLURM_JOB_NODELIST): progress lines, the join-timeout message and fsrdzv status name the missing ones",
    )
    p.add_argument(
        "--nproc-per-node", type=count(1), default=1, metavar="N", help="copies of CMD on this node (default: 1)"
    )
    p.add_argument(
        "--scale-up-at",
        choices=SCALE_UP_AT,
        default="any_time",
        help="when a waiting node may make the round re-form: any_time (torch's) or safe_point, once every "
        "node's CMD called fsrdzv.safe_point() (default: any_time)",
    )
    timing = p.add_argument_group("timing (seconds, or durations like 500ms, 2m)")
    timing.add_argument(
        "--join-timeout",
        type=positive_duration,
        default=DEFAULTS["join_timeout"],
        metavar="T",
        help=f"a join must finish within (default: {DEFAULTS['join_timeout']:g})",
    )
    timing.add_argument(
        "--last-call-timeout",
        type=positive_duration,
        default=DEFAULTS["last_call_timeout"],
        metavar="T",
        help=f"wait for more nodes once MIN joined (default: {DEFAULTS['last_call_timeout']:g})",
    )
    timing.add_argument(
        "--close-timeout",
        type=positive_duration,
        default=DEFAULTS["close_timeout"],
        metavar="T",
        help=f"closing the run must finish within (default: {DEFAULTS['close_timeout']:g})",
    )
    timing.add_argument(
        "--keep-alive-interval",
        type=positive_duration,
        default=DEFAULTS["keep_alive_interval"],
        metavar="T",
        help=f"heartbeat period (default: {DEFAULTS['keep_alive_interval']:g})",
    )
    timing.add_argument(
        "--keep-alive-max-attempt",
        type=count(1),
        default=int(DEFAULTS["keep_alive_max_attempt"]),
        metavar="N",
        help=f"missed heartbeats before a node is dead (default: {DEFAULTS['keep_alive_max_attempt']:g})",
    )
    timing.add_argument(
        "--heartbeat-timeout",
        type=positive_duration,
        default=DEFAULTS["heartbeat_timeout"],
        metavar="T",
        help=f"read deadline when polling for waiting nodes or closure (default: {DEFAULTS['heartbeat_timeout']:g})",
    )
    timing.add_argument(
        "--monitor-interval",
        type=positive_duration,
        default=LAUNCH_DEFAULTS["monitor_interval"],
        metavar="T",
        help=f"membership check period while CMD runs (default: {LAUNCH_DEFAULTS['monitor_interval']:g})",
    )
    timing.add_argument(
        "--stop-timeout",
        type=positive_duration,
        default=LAUNCH_DEFAULTS["stop_timeout"],
        metavar="T",
        help=f"SIGTERM to SIGKILL grace when stopping CMD (default: {LAUNCH_DEFAULTS['stop_timeout']:g})",
    )
    timing.add_argument(
        "--scale-up-max-delay",
        type=parse_duration,
        default=DEFAULT_MAX_DELAY,
        metavar="T",
        help=f"with --scale-up-at safe_point, admit a waiting node after this long anyway (default: "
        f"{DEFAULT_MAX_DELAY:g})",
    )
    p.add_argument(
        "--watch-peers",
        type=count(0),
        default=int(LAUNCH_DEFAULTS["watch_peers"]),
        metavar="N",
        help=f"peers whose heartbeats each node reads (ring; 0: all; default: {LAUNCH_DEFAULTS['watch_peers']:g})",
    )
    p.add_argument("--quiet", action="store_true", help="log only warnings and errors of the launcher")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command and its arguments")
    common(p)
    p.set_defaults(func=cmd_run)
