"""Where a command acts: the endpoint, the run id and the job secret, from options and the environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from .._errors import RendezvousError, StateCorruptError
from .._secret import job_secret
from .._store import Store
from .._stores import list_runs, open_store, split_endpoint
from ._exits import EXIT_NOT_FOUND, EXIT_STORAGE, EXIT_USAGE, CliError

__all__ = ["endpoint_of", "not_found", "open_run", "run_exists", "run_id_of", "secret_of"]


def secret_of(args: argparse.Namespace) -> bytes | None:
    """The job secret of ``--secret-file``, else of ``$FSRDZV_SECRET_FILE``, else None."""
    if "secret_file" not in args:
        return None
    return job_secret(args.secret_file)


def endpoint_of(args: argparse.Namespace, *, check_directory: bool = True, option: str = "ENDPOINT") -> str:
    """The endpoint of the command line or ``$FSRDZV_ENDPOINT``; a directory must exist (it is the mount)."""
    endpoint: str | None = getattr(args, "endpoint", None) or os.environ.get("FSRDZV_ENDPOINT")
    if not endpoint:
        kinds = "s3://, az://, gs:// URL" if check_directory else "object-store URL"
        raise CliError(f"no endpoint: give {option} (a shared directory or {kinds}) or set FSRDZV_ENDPOINT", EXIT_USAGE)
    if not check_directory:
        return endpoint
    scheme, rest = split_endpoint(endpoint)
    path = os.path.expanduser(rest)
    if scheme == "file" and os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"endpoint {rest} is a file, not a directory; give the shared directory", EXIT_STORAGE)
    if scheme == "file" and not os.path.isdir(path):
        raise CliError(
            f"endpoint directory {rest} does not exist; check the path, and that the shared file system is mounted "
            "on this node",
            EXIT_STORAGE,
        )
    return endpoint


def run_id_of(args: argparse.Namespace, *, from_env: bool) -> str:
    run_id: str | None = args.run_id
    if not run_id and from_env:
        run_id = os.environ.get("FSRDZV_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if not run_id:
        hint = " (or set FSRDZV_RUN_ID / SLURM_JOB_ID)" if from_env else ""
        raise CliError(f"no run id: give --run-id ID{hint}", EXIT_USAGE)
    return run_id


def open_run(args: argparse.Namespace, endpoint: str, run_id: str) -> Store:
    return open_store(endpoint, run_id, storage_options=dict(args.storage_options), secret=secret_of(args))


def not_found(endpoint: str, run_id: str, options: Mapping[str, Any]) -> CliError:
    """The error for a run that does not exist, listing the runs that do."""
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


def run_exists(store: Store) -> bool:
    try:
        if store.read() is not None:
            return True
    except StateCorruptError:
        return True
    return bool(store.list_records("hb") or store.list_records("req"))
