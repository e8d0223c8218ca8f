"""torch's ``RendezvousHandler`` on fsrdzv's core handler, with a fresh TCPStore for every round."""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Final, Protocol

# torch.distributed imports these names from its C extension without re-exporting them for type checkers; the
# public names are the ones to use at run time, and mypy still sees their real types.
from torch.distributed import PrefixStore, Store, TCPStore  # type: ignore[attr-defined]
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
)

from .. import _errors as fe
from .._ports import PortReservation
from ._backend import BACKEND_NAME
from ._config import DEFAULT_STORE_TIMEOUT
from ._errors import (
    GracefulExit,
    TorchConnectionError,
    TorchGracefulExitError,
    TorchRendezvousError,
    torch_errors,
)

__all__ = ["WARN_INTERVAL", "CoreHandler", "FsRendezvousHandler", "connect_error"]

log = logging.getLogger("fsrdzv.torchrun")

#: Seconds between two warnings about failed ``num_nodes_waiting`` polls (the agent polls every 0.1 s).
WARN_INTERVAL: Final = 30.0
#: torch's switch: "1" turns the agent's store off for the workers (``use_agent_store`` False).
DISABLE_SHARING_ENV: Final = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


class _CoreInfo(Protocol):
    """What this module reads from :class:`fsrdzv.RendezvousInfo`."""

    @property
    def round(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def master_addr(self) -> str: ...
    @property
    def master_port(self) -> int: ...


class CoreHandler(Protocol):
    """What this module needs from fsrdzv's core handler (:func:`fsrdzv.create_handler`)."""

    @property
    def run_id(self) -> str: ...
    def next_rendezvous(self) -> _CoreInfo: ...
    def num_nodes_waiting(self) -> int: ...
    def is_closed(self) -> bool: ...
    def set_closed(self) -> None: ...
    def shutdown(self) -> bool: ...


def connect_error(what: str, addr: str, port: int, exc: BaseException) -> TorchConnectionError:
    return TorchConnectionError(f"{what} {addr}:{port} failed: {exc}")


class FsRendezvousHandler(RendezvousHandler):
    """torch's ``RendezvousHandler`` on fsrdzv's core handler, plus the per-round TCPStore the agent needs.

    :param core: the fsrdzv handler that runs the protocol on the shared storage.
    :param store_timeout: seconds for the TCPStore: clients retry connecting to rank 0's server this long, and the
        agent's blocking ``get`` calls wait this long.
    :param graceful_exit: ``"exit"`` raises :class:`GracefulExit` (status 0) when a spare sees the run close, which
        is what torchrun needs; ``"raise"`` raises torch's ``RendezvousGracefulExitError`` as torch's handler does.
    :param worker_env: ``FSRDZV_*`` variables for the workers (the run's coordinates for :func:`fsrdzv.safe_point`);
        each completed round puts them, with ``FSRDZV_ROUND``, into this process's environment, which torch's
        agent copies into every worker it starts.
    """

    def __init__(
        self,
        core: CoreHandler,
        *,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
        graceful_exit: str = "raise",
        ports: PortReservation | None = None,
        worker_env: Mapping[str, str] | None = None,
    ) -> None:
        if graceful_exit not in ("exit", "raise"):
            raise fe.ConfigurationError(f"graceful_exit must be 'exit' or 'raise', not {graceful_exit!r}")
        self._core = core
        self._ports = ports if ports is not None else PortReservation()
        self._timeout = datetime.timedelta(seconds=store_timeout)
        self._graceful_exit = graceful_exit
        self._worker_env = dict(worker_env or {})
        self._lock = threading.Lock()
        # The server this agent hosts for the current round when it is rank 0.
        self._server: TCPStore | None = None
        self._last_warning = -math.inf

    # -- torch's interface --------------------------------------------------------------------------------------

    def get_backend(self) -> str:
        return BACKEND_NAME

    @property
    def use_agent_store(self) -> bool:
        # torch's rule, read on every access: rank 0's agent hosts the workers' store unless the switch is "1";
        # then worker rank 0 binds a free port of its own, published per round (see _bootstrap).
        return os.getenv(DISABLE_SHARING_ENV, "0") != "1"

    def get_run_id(self) -> str:
        return self._core.run_id

    def next_rendezvous(self) -> RendezvousInfo:
        try:
            with torch_errors():
                info = self._core.next_rendezvous()
        except TorchGracefulExitError as exc:
            self._release_server()
            if self._graceful_exit == "exit":
                # A warning, not info: it is the only line an agent that never trained prints about why it ended.
                log.warning("fsrdzv: %s; this spare node exits with status 0", exc)
                raise GracefulExit(str(exc)) from exc
            raise
        except BaseException:
            self._release_server()
            raise
        # Every member of the new round has left the previous one, so nobody uses the previous server any more.
        self._release_server()
        store = self._round_store(info)
        if self._worker_env:
            os.environ.update({**self._worker_env, "FSRDZV_ROUND": str(info.round)})
        return RendezvousInfo(store, info.rank, info.world_size, self._bootstrap(info, store))

    def _bootstrap(self, info: _CoreInfo, store: Store) -> RendezvousStoreInfo:
        if self.use_agent_store:
            return RendezvousStoreInfo(master_addr=info.master_addr, master_port=info.master_port)
        # Sharing off, as torch does it: rank 0 publishes its address and a free port in the round's key space,
        # and every member reads them back (a fresh key space every round, so never a stale port).
        try:
            with torch_errors():
                return RendezvousStoreInfo.build(info.rank, store, local_addr=info.master_addr)
        except BaseException:
            self._release_server()
            raise

    def is_closed(self) -> bool:
        with torch_errors():
            return self._core.is_closed()

    def set_closed(self) -> None:
        with torch_errors():
            self._core.set_closed()

    def num_nodes_waiting(self) -> int:
        # The agent polls this every monitor interval while training runs. torch lets any error escape, which
        # ends the agent and closes the run for everyone; on an object store a passing outage or throttling
        # would then kill a healthy job. A storage failure here only delays noticing new nodes, so it answers
        # "nobody waiting" and warns (at most every WARN_INTERVAL s). A corrupt document still raises.
        try:
            with torch_errors():
                waiting = self._core.num_nodes_waiting()
        except TorchConnectionError as exc:
            now = time.monotonic()
            if now - self._last_warning >= WARN_INTERVAL:
                self._last_warning = now
                log.warning("fsrdzv: cannot poll waiting nodes of run %r (will retry): %s", self._core.run_id, exc)
            return 0
        return waiting

    def shutdown(self) -> bool:
        # Like torch: stop heartbeating and close the run; a rendezvous error is reported as False, not raised.
        try:
            with torch_errors():
                return self._core.shutdown()
        except TorchRendezvousError as exc:
            log.warning("fsrdzv: shutting down the rendezvous of run %r failed: %s", self._core.run_id, exc)
            return False
        finally:
            self._release_server()
            self._ports.release()

    # -- the per-round store ----------------------------------------------------------------------------------

    def _round_store(self, info: _CoreInfo) -> Store:
        addr, port = info.master_addr, info.master_port
        if info.rank == 0:
            self._start_server(info.round, addr, port)
        try:
            # Every member, rank 0 included, uses a client: the server object stays private to this handler, so
            # dropping it at the next round closes the listening socket whatever the agent still holds.
            client = TCPStore(host_name=addr, port=port, is_master=False, timeout=self._timeout)
        except (RuntimeError, ValueError) as exc:  # DistNetworkError and DistStoreError are RuntimeErrors
            self._release_server()
            raise connect_error(
                f"connecting to rank 0's TCPStore for round {info.round} of run {self._core.run_id!r} at",
                addr,
                port,
                exc,
            ) from exc
        return PrefixStore(f"torch.rendezvous.{self._core.run_id}.{info.round}", client)

    def _start_server(self, round_: int, addr: str, port: int) -> None:
        # Serve on the socket that has been listening on the offered port since the join: nothing else could
        # take the port in between (a bind at this point could lose it to any process on the host).
        listener = self._ports.take(port)
        try:
            server = TCPStore(
                host_name=addr,
                port=port,
                is_master=True,
                multi_tenant=True,
                wait_for_workers=False,
                timeout=self._timeout,
                master_listen_fd=None if listener is None else listener.fileno(),
            )
        except (RuntimeError, ValueError) as exc:
            raise connect_error(
                f"starting the TCPStore server for round {round_} of run {self._core.run_id!r} on", addr, port, exc
            ) from exc
        except BaseException:
            if listener is not None:
                listener.close()
            raise
        if listener is not None:
            listener.detach()  # the server now owns the descriptor and closes it when it goes
        with self._lock:
            self._server = server

    def _release_server(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        # The TCPStore server stops listening when its last Python reference goes; connections already open are
        # served until their clients go (the old round's workers are stopped before the agent re-rendezvouses).
        del server
