"""The commands that change one run, ``close`` and ``reset``, through :class:`fsrdzv._admin.RunAdmin`."""

from __future__ import annotations

import argparse
import sys

from .._admin import RunAdmin
from .._errors import RendezvousTimeoutError
from .._text import one_line
from ._context import endpoint_of, not_found, open_run, run_exists, run_id_of
from ._exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError

__all__ = ["cmd_close", "cmd_reset"]


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
