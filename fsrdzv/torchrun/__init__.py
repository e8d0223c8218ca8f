"""torchrun integration: ``torchrun --rdzv-backend=fsrdzv --rdzv-endpoint=<dir or URL> ...``.

This is the only fsrdzv package that imports torch (``pip install '.[torch]'`` in a clone of fsrdzv). It offers
two things:

* :func:`handler_creator`, the ``torchrun.handlers`` entry point. torch calls it with no arguments and registers the
  returned ``create(params)`` under the entry-point name ``fsrdzv``. The handler it builds runs fsrdzv's own
  protocol on the shared storage and gives the elastic agent what it needs on top: a real
  ``torch.distributed.Store`` shared by the round's members, in a fresh key space every round, and
  MASTER_ADDR/MASTER_PORT of that store.
* :class:`FsRendezvousBackend`, torch's ``RendezvousBackend`` (one compare-and-set blob) on fsrdzv storage, for
  users who want torch's own ``DynamicRendezvousHandler`` on a directory or object store.

Deliberate differences from torch 2.13's ``c10d`` / dynamic handler:

* **The bootstrap store is per round.** Rank 0's agent starts a new ``TCPStore`` server for every round on the
  address and port agreed in the rendezvous document, and every member connects to it. torch caches the first
  round's address, which leaves the old rank 0 publishing nothing (scale-up hangs) or two masters after a rank
  change (reference §13.1); a fresh server also means no keys of an earlier attempt are visible (§13.2).
* **A spare that sees the run close exits with status 0.** torch raises ``RendezvousGracefulExitError``; its agent
  catches it and returns ``None``, and ``launch_agent`` then crashes on ``None.is_failed()`` with rc 1 (§13.4).
  The handler made by the entry point raises :class:`GracefulExit` instead, a ``SystemExit(0)``: torch's own
  ``@record`` wrapper of the torchrun ``main`` turns ``SystemExit(0)`` into a normal return, the agent still
  stops its (empty) worker group in its ``finally``, and ``launch_agent`` still calls ``shutdown()``.
* **Settings are validated.** Unknown ``--rdzv-conf`` keys and malformed values fail at start with one line that
  names the key and the value; keep-alive settings must be positive (§13.5). Seconds may be fractional.
* **A storage hiccup does not end training.** ``num_nodes_waiting`` (polled every 0.1 s) answers 0 and warns when
  the storage cannot be read, instead of raising into the agent (which would close the run for every node).

``--rdzv-conf`` keys:

* torch's, with torch's defaults: ``join_timeout`` (600), ``last_call_timeout`` (30), ``close_timeout`` (30),
  ``heartbeat_timeout`` (5), ``keep_alive_interval`` (5), ``keep_alive_max_attempt`` (3). ``timeout``, which
  torchrun always adds, is ignored, as torch's dynamic handler does.
* ``read_timeout`` (60): seconds for the per-round TCPStore (as for torch's c10d backend).
* ``secret_file``: a file holding the job secret; every document and record is then HMAC-signed and checked.
* storage options of the endpoint's store: directories ``lock``, ``lock_timeout``, ``permissions``, ``fsync``;
  ``s3://`` ``endpoint_url``, ``region``, ``profile``, ``anon``; ``gs://`` ``endpoint_url``, ``project``,
  ``token``, ``retry_timeout``; ``az://`` ``account_name``, ``account_url`` (or ``endpoint_url``),
  ``account_host``, ``anon``; object stores also ``skip_selftest``. Credentials are never taken from
  ``--rdzv-conf`` (torchrun logs it): the stores read them from the environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

from .. import _errors as fe
from .. import create_handler as create_core_handler
from .._ports import PortReservation as PortReservation
from ._backend import BACKEND_NAME, FsRendezvousBackend
from ._config import DEFAULT_STORE_TIMEOUT as DEFAULT_STORE_TIMEOUT
from ._config import TorchrunConfig, parse_config, worker_variables
from ._errors import GracefulExit, to_torch, torch_errors
from ._handler import WARN_INTERVAL as WARN_INTERVAL
from ._handler import CoreHandler as CoreHandler
from ._handler import FsRendezvousHandler
from ._logs import show_logs

__all__ = [
    "BACKEND_NAME",
    "FsRendezvousBackend",
    "FsRendezvousHandler",
    "GracefulExit",
    "TorchrunConfig",
    "handler_creator",
    "parse_config",
    "torch_errors",
]

log = logging.getLogger("fsrdzv.torchrun")


def create_handler(params: RendezvousParameters, *, graceful_exit: str = "exit") -> FsRendezvousHandler:
    """Build the torchrun handler from torch's parameters (what ``--rdzv-backend=fsrdzv`` runs).

    Not :func:`fsrdzv.create_handler`, which it calls (as ``create_core_handler``) for the protocol underneath.

    :raises ValueError: (``fsrdzv.ConfigurationError``) an unknown ``--rdzv-conf`` key, a malformed value, or an
        invalid endpoint or run id; the message names the key and the value.
    """
    show_logs()
    ports = PortReservation()
    try:
        config = parse_config(params)
        core = create_core_handler(
            config.endpoint,
            config.run_id,
            config.min_nodes,
            config.max_nodes,
            port_factory=ports.reserve,
            **config.handler_kwargs(),
        )
    except fe.ConfigurationError as exc:
        # torchrun prints a long traceback ending with this line; log it first, where the user looks.
        log.error("fsrdzv: %s", exc)
        raise  # already a ValueError with a message that names the setting
    except fe.RendezvousError as exc:
        raise to_torch(exc) from exc
    return FsRendezvousHandler(
        core,
        store_timeout=config.store_timeout,
        graceful_exit=graceful_exit,
        ports=ports,
        worker_env=worker_variables(config, core.node_id, core.scale_up.flag_path),
    )


def handler_creator() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """The ``torchrun.handlers`` entry point: torch calls it with no arguments and registers what it returns."""
    return create_handler
