"""What a process finds in its environment about the run it belongs to (``FSRDZV_*``), read in one place.

The launcher (``fsrdzv run``) exports these variables to the program it starts; a user exports them to run a
plug-in (``fsrdzv.jax``) without the launcher. Every value is checked here, so that a typo is reported with the
variable's name and the fix instead of surfacing later as an unrelated failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigurationError

__all__ = ["LaunchedRound", "RunEnvironment", "launched_round", "run_environment", "storage_options_from_env"]


@dataclass(frozen=True)
class RunEnvironment:
    """Where the run is and how many nodes it takes, as the environment says."""

    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    storage_options: dict[str, Any]
    local_addr: str | None


@dataclass(frozen=True)
class LaunchedRound:
    """The round ``fsrdzv run`` formed for this process (its program's environment)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    round: int
    local_rank: int
    local_world_size: int


def storage_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``$FSRDZV_STORAGE_OPTIONS`` as a dict (a JSON object), or {} when unset."""
    environ = os.environ if environ is None else environ
    raw = environ.get("FSRDZV_STORAGE_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigurationError(f"FSRDZV_STORAGE_OPTIONS is not valid JSON ({exc}); use a JSON object") from None
    if not isinstance(value, dict):
        raise ConfigurationError('FSRDZV_STORAGE_OPTIONS must be a JSON object, e.g. {"lock": false}')
    return value


def _nnodes(text: str) -> tuple[int, int]:
    low, sep, high = text.strip().partition(":")
    try:
        lo = int(low)
        hi = int(high) if sep else lo
    except ValueError:
        raise ConfigurationError(f"FSRDZV_NNODES={text!r} is not MIN or MIN:MAX (for example 2 or 2:8)") from None
    if lo < 1 or hi < lo:
        raise ConfigurationError(f"FSRDZV_NNODES={text!r} needs 1 <= MIN <= MAX (for example 2:8)")
    return lo, hi


def run_environment(environ: Mapping[str, str] | None = None) -> RunEnvironment:
    """The run named by ``FSRDZV_ENDPOINT``, ``FSRDZV_RUN_ID`` (or ``SLURM_JOB_ID``) and ``FSRDZV_NNODES``.

    :raises ConfigurationError: a variable is missing or malformed (the message names it).
    """
    environ = os.environ if environ is None else environ
    endpoint = environ.get("FSRDZV_ENDPOINT", "").strip()
    if not endpoint:
        raise ConfigurationError("FSRDZV_ENDPOINT is not set: export the shared directory or s3:// URL of the run")
    run_id = environ.get("FSRDZV_RUN_ID", "").strip() or environ.get("SLURM_JOB_ID", "").strip()
    if not run_id:
        raise ConfigurationError("FSRDZV_RUN_ID is not set (nor SLURM_JOB_ID): export the same run id on every node")
    nnodes = environ.get("FSRDZV_NNODES", "").strip()
    if not nnodes:
        raise ConfigurationError("FSRDZV_NNODES is not set: export the node count as MIN or MIN:MAX, e.g. 2:8")
    low, high = _nnodes(nnodes)
    local_addr = environ.get("FSRDZV_LOCAL_ADDR", "").strip() or None
    return RunEnvironment(endpoint, run_id, low, high, storage_options_from_env(environ), local_addr)


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        raise ConfigurationError(f"{name}={environ.get(name)!r} is not an integer; fsrdzv run sets it") from None


def launched_round(environ: Mapping[str, str] | None = None) -> LaunchedRound | None:
    """The round of ``fsrdzv run`` this process was started in, or None outside the launcher."""
    environ = os.environ if environ is None else environ
    # FSRDZV_RESTART_COUNT too: torchrun's workers get FSRDZV_NODE_ID and FSRDZV_ROUND (for fsrdzv.safe_point)
    # but their MASTER_PORT is the agent's store, not a round of the launcher.
    if any(name not in environ for name in ("FSRDZV_NODE_ID", "FSRDZV_ROUND", "FSRDZV_RESTART_COUNT")):
        return None
    return LaunchedRound(
        rank=_int(environ, "RANK"),
        world_size=_int(environ, "WORLD_SIZE"),
        master_addr=environ.get("MASTER_ADDR", ""),
        master_port=_int(environ, "MASTER_PORT"),
        round=_int(environ, "FSRDZV_ROUND"),
        local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else 1,
    )
