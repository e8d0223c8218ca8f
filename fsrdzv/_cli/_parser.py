"""The ``fsrdzv`` argument parser and its help prose; one function per command."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from typing import NoReturn, Protocol

from .._settings import DEFAULTS
from ._admin_cmds import cmd_close, cmd_reset
from ._commands import cmd_demo, cmd_doctor, cmd_list, cmd_status
from ._exits import EXIT_CODES, EXIT_USAGE, CliError
from ._gc import cmd_gc
from ._run_parser import add_run
from ._values import count, parse_duration, positive_duration

__all__ = ["build_parser"]

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


class _Add(Protocol):
    def __call__(self, name: str, help_text: str, description: str, epilog: str = "") -> argparse.ArgumentParser: ...


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


def _add_status(add: _Add) -> None:
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
        type=positive_duration,
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


def _add_list(add: _Add) -> None:
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


def _add_close(add: _Add) -> None:
    p = add(
        "close",
        "close a run: its nodes stop (RendezvousClosedError)",
        "Close a run with one compare-and-set: every node sees RendezvousClosedError at its next check, and spares "
        "exit normally. Closing is idempotent. A run id whose nodes are all gone can be used again by a new job.",
    )
    _endpoint_arg(p)
    p.add_argument("--run-id", metavar="ID", help="the run to close (required)")
    p.add_argument(
        "--timeout",
        type=positive_duration,
        default=DEFAULTS["close_timeout"],
        metavar="DURATION",
        help=f"give up after (default: {DEFAULTS['close_timeout']:g}s)",
    )
    _common(p)
    p.set_defaults(func=cmd_close)


def _add_gc(add: _Add) -> None:
    p = add(
        "gc",
        "remove finished runs, and the records crashed nodes left in live ones; never a live node's",
        "Remove runs that are closed or whose nodes are all gone, and in every run kept (live ones too) delete the "
        "records of gone nodes: the heartbeat and join requests of a node in no list of the document whose "
        "heartbeat is dead, and a join request the document already folded of a node in no list without a "
        "heartbeat record (a leftover of a removed node). A heartbeat is dead, and a run shows no life, when no "
        "record changes for the run's liveness timeout (keep_alive_interval x keep_alive_max_attempt as its "
        "document records them) and at least --window, timed on this host's monotonic clock. Never touched: the "
        "records of members, of nodes whose heartbeat changes, and a request newer than what the document folded "
        "for its node. Runs with an unreadable document are kept (use 'fsrdzv reset --force').",
        "examples:\n  fsrdzv gc /shared/rdzv --dry-run\n  fsrdzv gc s3://bucket/rdzv --older-than 7d\n"
        "  fsrdzv gc /shared/rdzv --run-id job-42 --json\n\nJSON schema: fsrdzv.gc/1 (docs/cli-json-schema.md)",
    )
    _endpoint_arg(p)
    p.add_argument("--run-id", metavar="ID", help="only this run (default: every run at the endpoint)")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        default=86400.0,
        metavar="DURATION",
        help="remove whole only runs idle at least this long by storage time (default: 24h; 0: any age)",
    )
    p.add_argument(
        "--window",
        type=positive_duration,
        default=15.0,
        metavar="DURATION",
        help="shortest liveness observation (default: 15s; a run whose document records a longer liveness "
        "timeout is watched for that long)",
    )
    p.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    p.add_argument("--json", action="store_true", help="print the fsrdzv.gc/1 JSON object")
    _common(p)
    p.set_defaults(func=cmd_gc)


def _add_reset(add: _Add) -> None:
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


def _add_doctor(add: _Add) -> None:
    from .._doctor import CHECKS

    p = add(
        "doctor",
        "check that an endpoint gives real CAS, working locks, safe mount options, a sane clock",
        "Check an endpoint with a scratch run (removed afterwards), one verdict per check:\n"
        "  reach    create, read and delete data\n"
        "  cas      racing conditional writes: exactly one winner; stale tokens refused\n"
        "  lock     (directories) a lock held by another process excludes this one\n"
        "  mount    (directories) mount options that break locking or caching (NFS nolock/local_lock/nocto,\n"
        "           actimeo/noac/lookupcache, Lustre localflock/noflock, FUSE), from /proc/self/mountinfo\n"
        "  space    (directories) free space and inodes against what a run needs (64 log entries, records)\n"
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
        "--writers", type=count(2), default=2, metavar="N", help="racing writers in the CAS check (default: 2)"
    )
    p.add_argument("--rounds", type=count(1), default=5, metavar="N", help="update races in the CAS check (default: 5)")
    p.add_argument(
        "--samples", type=count(1), default=10, metavar="N", help="latency samples per operation (default: 10)"
    )
    _common(p)
    p.set_defaults(func=cmd_doctor)


def _add_demo(add: _Add) -> None:
    p = add(
        "demo",
        "watch an elastic job on a temporary directory: formation, a node killed, a node added",
        "Start local nodes ('fsrdzv run' processes running a tiny Python program) on a temporary directory, "
        "then show, as a timeline with timings: the first round forming, one node killed with SIGKILL and the "
        "others re-forming, one node added and the job scaling up, and the job finishing. Cleans up after "
        "itself; takes a few seconds.",
    )
    p.add_argument("--nodes", type=count(2), default=4, metavar="N", help="nodes to start with (default: 4)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    p.add_argument("--verbose", action="store_true", help="also show the launchers' own log lines")
    _common(p, store=False)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsrdzv",
        formatter_class=_Formatter,
        description="Elastic rendezvous on shared storage: inspect and operate runs, launch any program "
        "elastically, try it out with a demo.",
        epilog=_EPILOG_CODES + "\n" + _ENV_HELP + "\nrun 'fsrdzv COMMAND --help' for the options of a command.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fsrdzv {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_text: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=_wrap(description),
            epilog=(epilog + "\n\n" if epilog else "") + _EPILOG_CODES,
            formatter_class=_Formatter,
        )

    _add_status(add)
    _add_list(add)
    _add_close(add)
    _add_gc(add)
    _add_reset(add)
    _add_doctor(add)
    add_run(add, _common)
    _add_demo(add)
    return parser
