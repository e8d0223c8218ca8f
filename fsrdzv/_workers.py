"""The launcher's local worker group: ``--nproc-per-node`` processes with torchrun's worker environment.

Each local process gets the variables torch's ``LocalElasticAgent`` sets (checked against torchrun 2.13):
``RANK = GROUP_RANK x nproc + LOCAL_RANK``, ``WORLD_SIZE = nodes x nproc``, ``GROUP_WORLD_SIZE = nodes``,
``ROLE_NAME = "default"``, ``ROLE_RANK = RANK``, ``ROLE_WORLD_SIZE = WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` of
global rank 0, ``TORCHELASTIC_RUN_ID``/``RESTART_COUNT``/``MAX_RESTARTS``, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``
(unless set) and, with several processes, ``OMP_NUM_THREADS=1`` (unless set), plus fsrdzv's own ``FSRDZV_*``.
``TORCHELASTIC_USE_AGENT_STORE`` is ``False``: no agent store exists, worker rank 0 binds ``MASTER_PORT`` itself.

As in torchrun, the group fails as soon as one process fails: the others are stopped (each process is a group
of its own, stopped as a whole), and the group succeeds when every process has exited with 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ._command import exit_status, kill_group, spawn, stop_group
from ._handler import RendezvousInfo

__all__ = ["WorkerGroup", "WorkerSetup", "worker_env"]

#: Storage option keys that may carry a credential: never exported to the workers' environment (a credential
#: there would show in ``/proc/<pid>/environ`` of every worker). Credentials the user had in the environment
#: already stay where they were.
_CREDENTIAL_WORDS: Final = ("key", "secret", "token", "password", "credential", "connection_string", "sas")
#: gcsfs's ``token`` *kinds*, which name a way to authenticate, not a secret.
_TOKEN_KINDS: Final = frozenset({"anon", "google_default", "cloud", "browser", "cache"})


def _public(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if any(word in key.lower() for word in _CREDENTIAL_WORDS) and not (
            isinstance(value, str) and value in _TOKEN_KINDS
        ):
            continue
        out[key] = _public(value) if isinstance(value, Mapping) else value
    return out


class WorkerSetup:
    """What every round's workers get besides their ranks: the run's coordinates for :func:`fsrdzv.safe_point`."""

    def __init__(
        self,
        *,
        endpoint: str,
        run_id: str,
        nproc: int,
        max_restarts: int,
        storage_options: Mapping[str, Any],
        secret_file: str | None,
        flag_path: str | None,
    ) -> None:
        self.run_id = run_id
        self.nproc = nproc
        self.max_restarts = max_restarts
        self.common: dict[str, str] = {"FSRDZV_ENDPOINT": endpoint, "FSRDZV_RUN_ID": run_id}
        options = _public(storage_options)
        if options:
            self.common["FSRDZV_STORAGE_OPTIONS"] = json.dumps(options, sort_keys=True)
        if secret_file:
            self.common["FSRDZV_SECRET_FILE"] = os.path.abspath(os.path.expanduser(secret_file))
        if flag_path:
            self.common["FSRDZV_SAFE_POINT_FILE"] = flag_path


def worker_env(
    info: RendezvousInfo, setup: WorkerSetup, restarts: int, node_id: str, local_rank: int
) -> dict[str, str]:
    """The variables of local process ``local_rank`` for one round (torch's names, plus fsrdzv's own)."""
    nproc = setup.nproc
    rank = info.rank * nproc + local_rank
    world = info.world_size * nproc
    env = {
        **setup.common,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(info.rank),
        "GROUP_WORLD_SIZE": str(info.world_size),
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world),
        "ROLE_NAME": "default",
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
        "TORCHELASTIC_RUN_ID": setup.run_id,
        "TORCHELASTIC_RESTART_COUNT": str(restarts),
        "TORCHELASTIC_MAX_RESTARTS": str(setup.max_restarts),
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "FSRDZV_ROUND": str(info.round),
        "FSRDZV_RESTART_COUNT": str(restarts),
        "FSRDZV_MAX_RESTARTS": str(setup.max_restarts),
        "FSRDZV_NODE_ID": node_id,
    }
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # torchrun's default against oversubscribing the cores
    return env


class WorkerGroup:
    """The local processes of one round, started and stopped together."""

    def __init__(self, cmd: Sequence[str], envs: Sequence[Mapping[str, str]]) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for env in envs:
                self.procs.append(spawn(cmd, {**os.environ, **env}))
        except BaseException:
            self.kill(signal.SIGKILL)
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s; the group's exit status once it is over (the first failure, else 0), else None.

        A failed process ends the group: the caller stops the others (:meth:`stop`).
        """
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [exit_status(c) for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            running = next(p for p, c in zip(self.procs, codes, strict=True) if c is None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                running.wait(timeout=min(left, 0.02 if len(self.procs) > 1 else left))

    def kill(self, sig: int) -> None:
        for p in self.procs:
            kill_group(p, sig)

    def stop(self, timeout: float, why: str) -> None:
        """Stop every process's group: SIGTERM to all at once, then SIGKILL after ``timeout``."""
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            stop_group(p, max(0.0, deadline - time.monotonic()), why)
