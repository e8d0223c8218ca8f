"""The ``fsrdzv`` command line: inspect and operate a rendezvous, launch any program elastically, and a demo.

Every command reports a problem as exactly one line on stderr, ``fsrdzv <command>: error: <cause>; <hint>``, and
exits with a documented status (:data:`EXIT_CODES`); ``--debug`` adds the traceback and debug logging. Nothing
here decides protocol questions: the commands read the document through :mod:`fsrdzv._status`, change it only
through :class:`fsrdzv._admin.RunAdmin` (``close``, ``reset``, ``gc``), and judge liveness with the handler's own
:class:`fsrdzv._liveness.LivenessTracker` (a record that changes, timed on this host's monotonic clock).

Modules: :mod:`._parser` (options and help), :mod:`._values` (option values), :mod:`._context` (endpoint, run id,
secret), :mod:`._commands`, :mod:`._admin_cmds` and :mod:`._gc` (the commands), :mod:`._render` (tables),
:mod:`._exits`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Sequence

from .._errors import RendezvousError
from .._text import one_line
from ._exits import EXIT_CODES, EXIT_OK, EXIT_USAGE, CliError, exit_code_for
from ._parser import build_parser
from ._values import parse_duration, parse_nnodes, parse_storage_options

__all__ = [
    "EXIT_CODES",
    "CliError",
    "build_parser",
    "exit_code_for",
    "main",
    "parse_duration",
    "parse_nnodes",
    "parse_storage_options",
]

log = logging.getLogger("fsrdzv.cli")

_COMMANDS = frozenset({"status", "list", "close", "gc", "reset", "doctor", "run", "demo"})


def _one_line(text: str) -> str:
    return one_line(text, None) or "unknown error"


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
        for name in ("fsrdzv.run", "fsrdzv.progress"):  # what a waiting node waits for, too (--quiet: not)
            logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    else:
        # The inspection commands speak through their output and one-line errors; library warnings would
        # add lines that scripts do not expect.
        handler.setFormatter(logging.Formatter("fsrdzv: %(message)s"))
        root.setLevel(logging.ERROR)


def _named_command(args: list[str]) -> str | None:
    """The command an argument list names (its first word that is one), for the error line of a bad option."""
    return next((a for a in args if a in _COMMANDS), None)


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
        command = command or _named_command(args_list)
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
        message = message.replace("(see 'fsrdzv --help')", f"(see '{prog} --help')")
        with contextlib.suppress(OSError):
            sys.stderr.write(f"{prog}: error: {message}\n")
            sys.stderr.flush()
        return code
