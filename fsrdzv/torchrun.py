"""torchrun integration: ``torchrun --rdzv-backend=fsrdzv --rdzv-endpoint=<dir or URL> ...``.

This is the only fsrdzv module that imports torch (``pip install 'fsrdzv[torch]'``). It offers two things:

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

import contextlib
import datetime
import difflib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

# torch.distributed imports these names from its C extension without re-exporting them for type checkers; the
# public names are the ones to use at run time, and mypy still sees their real types.
from torch.distributed import PrefixStore, Store, TCPStore  # type: ignore[attr-defined]
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError as TorchClosedError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError as TorchConnectionError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousError as TorchRendezvousError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousGracefulExitError as TorchGracefulExitError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousStateError as TorchStateError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousTimeoutError as TorchTimeoutError,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend

from . import _errors as fe
from ._handler import create_handler as _core_create_handler
from ._handler import read_secret_file
from ._store import Store as FsStore
from ._stores import open_store, split_endpoint

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

#: The name torchrun knows the backend by; it is the entry-point name and ``get_backend()`` must return it.
BACKEND_NAME: Final = "fsrdzv"

#: torch's c10d backend uses 60 s for its TCPStore; the agent's blocking gets (worker rank assignment) and the
#: clients' connection retries while rank 0's server comes up both run under this timeout.
DEFAULT_STORE_TIMEOUT: Final = 60.0
#: Seconds between two warnings about failed ``num_nodes_waiting`` polls (the agent polls every 0.1 s).
WARN_INTERVAL: Final = 30.0


# ---------------------------------------------------------------------------------------------------------------
# Errors: one boundary between fsrdzv's tree and torch's.
# ---------------------------------------------------------------------------------------------------------------


class GracefulExit(SystemExit):
    """A spare saw the run close: leave the process with status 0 (see the module docstring for why).

    ``SystemExit`` with code 0 is the one exception that torchrun's ``@record``-wrapped ``main`` turns into a normal
    return, and that no ``except Exception`` in the agent or launcher swallows or misreports.
    """

    def __init__(self, message: str) -> None:
        super().__init__(0)
        self.message = message

    def __str__(self) -> str:
        return self.message


# Order matters: the first matching fsrdzv class decides (subclasses before their bases).
_ERROR_MAP: Final[tuple[tuple[type[fe.RendezvousError], type[TorchRendezvousError]], ...]] = (
    (fe.RendezvousClosedError, TorchClosedError),
    (fe.RendezvousGracefulExitError, TorchGracefulExitError),
    (fe.RendezvousTimeoutError, TorchTimeoutError),
    (fe.RendezvousConnectionError, TorchConnectionError),
    (fe.RendezvousStateError, TorchStateError),
)


def _to_torch(exc: fe.RendezvousError) -> TorchRendezvousError:
    for ours, theirs in _ERROR_MAP:
        if isinstance(exc, ours):
            return theirs(str(exc))
    return TorchRendezvousError(str(exc))


@contextlib.contextmanager
def torch_errors() -> Iterator[None]:
    """Re-raise fsrdzv's rendezvous errors as torch's equivalents (the original is kept as ``__cause__``).

    The elastic agent and launcher only know torch's classes: a closed run, a timeout, a connection or state
    problem must reach them as such so that they stop, record and shut down the way they do for ``c10d``.
    """
    try:
        yield
    except fe.RendezvousError as exc:
        raise _to_torch(exc) from exc


# ---------------------------------------------------------------------------------------------------------------
# torch's RendezvousBackend on an fsrdzv Store.
# ---------------------------------------------------------------------------------------------------------------


class FsRendezvousBackend(RendezvousBackend):
    """torch's ``RendezvousBackend`` contract on an fsrdzv store (a directory, ``s3://``, ``az://``, ``gs://``...).

    Use it with torch's own handler::

        backend = FsRendezvousBackend("/shared/rdzv", run_id)
        handler = DynamicRendezvousHandler.from_backend(run_id, store, backend, min_nodes, max_nodes)

    Tokens are fsrdzv's opaque ``"<generation>:<version>"`` strings; any other value (``"invalid"``, bytes, an int)
    never writes and never raises. torch's handler stores its state as a pickle and unpickles whatever it reads,
    so anyone who can write the endpoint can run code on every agent: give a ``secret`` (the job secret, from a file
    only the job can read) and fsrdzv rejects documents without a valid HMAC before torch sees them.
    """

    def __init__(
        self,
        endpoint: str,
        run_id: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        secret: bytes | None = None,
    ) -> None:
        self._store: FsStore = open_store(endpoint, run_id, storage_options=dict(storage_options or {}), secret=secret)

    @property
    def name(self) -> str:
        return BACKEND_NAME

    @property
    def store(self) -> FsStore:
        """The fsrdzv store underneath (tests and tools use it)."""
        return self._store

    def get_state(self) -> tuple[bytes, Any] | None:
        with torch_errors():
            snapshot = self._store.read()
        if snapshot is None:
            return None
        return snapshot.data, snapshot.token

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        with torch_errors():
            # The store never raises for a foreign token: it answers won=False with the current document.
            result = self._store.compare_and_set(state, token)
        snapshot = result.snapshot
        if result.won:
            assert snapshot is not None  # a won CAS always carries the new snapshot
            return state, snapshot.token, True
        if snapshot is None:
            # A token was given but nothing is stored (the run was deleted under us): torch's "cannot tell" answer.
            # Its state holder then keeps its own copy and retries create-only.
            return None
        return snapshot.data, snapshot.token, False


# ---------------------------------------------------------------------------------------------------------------
# --rdzv-conf parsing.
# ---------------------------------------------------------------------------------------------------------------

#: torch's dynamic-rendezvous keys with torch's defaults (seconds; the last is a count).
_SECONDS_KEYS: Final = {
    "join_timeout": 600.0,
    "last_call_timeout": 30.0,
    "close_timeout": 30.0,
    "heartbeat_timeout": 5.0,
    "keep_alive_interval": 5.0,
}
_COUNT_KEYS: Final = {"keep_alive_max_attempt": 3}
#: Keys torchrun or torch add on their own; fsrdzv has no use for them.
_IGNORED_KEYS: Final = frozenset({"timeout"})
#: fsrdzv's own keys (not storage specific).
_OWN_KEYS: Final = frozenset({"read_timeout", "secret_file"})

# Storage options accepted in --rdzv-conf, per endpoint scheme: key -> (kind, where it goes). A path "a.b" puts the
# value under storage_options["a"]["b"]. Credentials are deliberately absent: torchrun prints every --rdzv-conf
# value in its start-up log and they would show in `ps`; the stores read them from the environment (AWS_*, AZURE_*,
# GOOGLE_APPLICATION_CREDENTIALS), and the job secret comes from a file (secret_file=).
_BOOL, _FLOAT, _STR = "bool", "float", "str"
_STORAGE_KEYS: Final[dict[str, dict[str, tuple[str, str]]]] = {
    "file": {
        "lock": (_BOOL, "lock"),
        "lock_timeout": (_FLOAT, "lock_timeout"),
        "permissions": (_STR, "permissions"),
        "fsync": (_BOOL, "fsync"),
    },
    "s3": {
        "endpoint_url": (_STR, "endpoint_url"),
        "region_name": (_STR, "client_kwargs.region_name"),
        "region": (_STR, "client_kwargs.region_name"),
        "profile": (_STR, "profile"),
        "anon": (_BOOL, "anon"),
        "skip_selftest": (_BOOL, "skip_selftest"),
    },
    "gs": {
        "endpoint_url": (_STR, "endpoint_url"),
        "project": (_STR, "project"),
        "token": (_STR, "token"),  # gcsfs's token *kinds* ("anon", "google_default", a key file path), not a secret
        "retry_timeout": (_FLOAT, "retry_timeout"),
        "skip_selftest": (_BOOL, "skip_selftest"),
    },
    "az": {
        "account_name": (_STR, "account_name"),
        "account_host": (_STR, "account_host"),
        "account_url": (_STR, "account_url"),
        "endpoint_url": (_STR, "account_url"),
        "anon": (_BOOL, "anon"),
        "skip_selftest": (_BOOL, "skip_selftest"),
    },
}
_SCHEME_FAMILY: Final = {"gcs": "gs", "abfs": "az", "abfss": "az"}

_TRUE: Final = frozenset({"1", "true", "t", "yes", "y"})
_FALSE: Final = frozenset({"0", "false", "f", "no", "n"})


@dataclass(frozen=True)
class TorchrunConfig:
    """Everything :func:`handler_creator` takes from torch's ``RendezvousParameters``, validated."""

    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    local_addr: str | None = None
    join_timeout: float = 600.0
    last_call_timeout: float = 30.0
    close_timeout: float = 30.0
    heartbeat_timeout: float = 5.0
    keep_alive_interval: float = 5.0
    keep_alive_max_attempt: int = 3
    store_timeout: float = DEFAULT_STORE_TIMEOUT
    storage_options: dict[str, Any] = field(default_factory=dict)
    secret: bytes | None = field(default=None, repr=False)

    def handler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fsrdzv.create_handler`."""
        return {
            "local_addr": self.local_addr,
            "storage_options": self.storage_options,
            "join_timeout": self.join_timeout,
            "last_call_timeout": self.last_call_timeout,
            "close_timeout": self.close_timeout,
            "heartbeat_timeout": self.heartbeat_timeout,
            "keep_alive_interval": self.keep_alive_interval,
            "keep_alive_max_attempt": self.keep_alive_max_attempt,
            "secret": self.secret,
        }


def _bad(key: str, value: object, expected: str) -> fe.ConfigurationError:
    return fe.ConfigurationError(f"invalid --rdzv-conf value {key}={value!r}: expected {expected}")


def _parse_seconds(key: str, value: object) -> float:
    # torch parses these with int(); whole seconds keep working, fractions are a deliberate extension. A timedelta
    # is what Python callers of torch's API tend to pass.
    if isinstance(value, datetime.timedelta):
        number = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad(key, value, "a positive number of seconds")
    else:
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except ValueError:
            raise _bad(key, value, "a positive number of seconds") from None
    if not math.isfinite(number) or number <= 0:
        raise _bad(key, value, "a positive number of seconds")
    return number


def _parse_count(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise _bad(key, value, "a positive integer")
    if isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise _bad(key, value, "a positive integer") from None
    else:
        raise _bad(key, value, "a positive integer")
    if number < 1:
        raise _bad(key, value, "a positive integer")
    return number


def _parse_bool(key: str, value: object) -> bool:
    # torch's get_as_bool spellings.
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _bad(key, value, "a boolean (true/false, yes/no, 1/0)")


def _parse_str(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(key, value, "a non-empty string")
    return value.strip()


def _read_secret(key: str, value: object) -> bytes:
    path = os.path.expanduser(_parse_str(key, value))
    try:
        return read_secret_file(path)
    except fe.ConfigurationError as exc:
        raise fe.ConfigurationError(f"invalid --rdzv-conf value {key}={value!r}: {exc}") from None


def _put(options: dict[str, Any], path: str, value: object) -> None:
    *parents, leaf = path.split(".")
    target = options
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def parse_config(params: RendezvousParameters) -> TorchrunConfig:
    """Validate torch's ``RendezvousParameters`` for fsrdzv.

    :raises fsrdzv.ConfigurationError: (a ``ValueError``) an unknown key or a malformed value, naming both.
    """
    scheme, _ = split_endpoint(params.endpoint)
    family = _SCHEME_FAMILY.get(scheme, scheme)
    storage_keys = _STORAGE_KEYS.get(family, {})
    known = set(_SECONDS_KEYS) | set(_COUNT_KEYS) | _OWN_KEYS | set(storage_keys)

    values: dict[str, Any] = {}
    storage_options: dict[str, Any] = {}
    secret: bytes | None = None
    for key, value in params.config.items():
        if key in _IGNORED_KEYS:
            continue
        if key in _SECONDS_KEYS or key == "read_timeout":
            values[key] = _parse_seconds(key, value)
        elif key in _COUNT_KEYS:
            values[key] = _parse_count(key, value)
        elif key == "secret_file":
            secret = _read_secret(key, value)
        elif key in storage_keys:
            kind, path = storage_keys[key]
            parsed: object
            if kind == _BOOL:
                parsed = _parse_bool(key, value)
            elif kind == _FLOAT:
                parsed = _parse_seconds(key, value)
            else:
                parsed = _parse_str(key, value)
            _put(storage_options, path, parsed)
        else:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise fe.ConfigurationError(
                f"unknown --rdzv-conf key {key!r} (value {value!r}) for the fsrdzv backend with a {scheme}:// "
                f"endpoint{suggestion} Known keys: {', '.join(sorted(known))}"
            )
    return TorchrunConfig(
        endpoint=params.endpoint,
        run_id=params.run_id,
        min_nodes=params.min_nodes,
        max_nodes=params.max_nodes,
        local_addr=params.local_addr,
        join_timeout=values.get("join_timeout", _SECONDS_KEYS["join_timeout"]),
        last_call_timeout=values.get("last_call_timeout", _SECONDS_KEYS["last_call_timeout"]),
        close_timeout=values.get("close_timeout", _SECONDS_KEYS["close_timeout"]),
        heartbeat_timeout=values.get("heartbeat_timeout", _SECONDS_KEYS["heartbeat_timeout"]),
        keep_alive_interval=values.get("keep_alive_interval", _SECONDS_KEYS["keep_alive_interval"]),
        keep_alive_max_attempt=values.get("keep_alive_max_attempt", _COUNT_KEYS["keep_alive_max_attempt"]),
        store_timeout=values.get("read_timeout", DEFAULT_STORE_TIMEOUT),
        storage_options=storage_options,
        secret=secret,
    )


# ---------------------------------------------------------------------------------------------------------------
# The torch-facing handler.
# ---------------------------------------------------------------------------------------------------------------


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


def _connect_error(what: str, addr: str, port: int, exc: BaseException) -> TorchConnectionError:
    return TorchConnectionError(f"{what} {addr}:{port} failed: {exc}")


class PortReservation:
    """Keeps a listening socket open on the master port this node offers, from its join until it serves.

    The core handler asks for a port at every join (``port_factory``); if this node becomes rank 0, the TCPStore
    server is started on that very socket (``master_listen_fd``), so the agreed port cannot be lost to another
    process in between. A node that does not lead the round releases its socket at the next join or shutdown.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    def reserve(self, addr: str) -> int:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, 0))
        except OSError:
            sock.bind(("", 0))  # local_addr may be a name other hosts resolve but this one cannot bind
        sock.listen(128)
        with self._lock:
            old, self._socket = self._socket, sock
        if old is not None:
            old.close()
        port: int = sock.getsockname()[1]
        return port

    def take(self, port: int) -> socket.socket | None:
        """Hand over the socket reserved for ``port`` (None if there is none, e.g. another handler's port)."""
        with self._lock:
            sock = self._socket
            if sock is None or sock.getsockname()[1] != port:
                return None
            self._socket = None
            return sock

    def release(self) -> None:
        with self._lock:
            sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


class FsRendezvousHandler(RendezvousHandler):
    """torch's ``RendezvousHandler`` on fsrdzv's core handler, plus the per-round TCPStore the agent needs.

    :param core: the fsrdzv handler that runs the protocol on the shared storage.
    :param store_timeout: seconds for the TCPStore: clients retry connecting to rank 0's server this long, and the
        agent's blocking ``get`` calls wait this long.
    :param graceful_exit: ``"exit"`` raises :class:`GracefulExit` (status 0) when a spare sees the run close, which
        is what torchrun needs; ``"raise"`` raises torch's ``RendezvousGracefulExitError`` as torch's handler does.
    """

    def __init__(
        self,
        core: CoreHandler,
        *,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
        graceful_exit: str = "raise",
        ports: PortReservation | None = None,
    ) -> None:
        if graceful_exit not in ("exit", "raise"):
            raise fe.ConfigurationError(f"graceful_exit must be 'exit' or 'raise', not {graceful_exit!r}")
        self._core = core
        self._ports = ports if ports is not None else PortReservation()
        self._timeout = datetime.timedelta(seconds=store_timeout)
        self._graceful_exit = graceful_exit
        self._lock = threading.Lock()
        # The server this agent hosts for the current round when it is rank 0.
        self._server: TCPStore | None = None
        self._last_warning = -math.inf

    # -- torch's interface --------------------------------------------------------------------------------------

    def get_backend(self) -> str:
        return BACKEND_NAME

    @property
    def use_agent_store(self) -> bool:
        # Always: rank 0's agent hosts the workers' store. torch's TORCH_DISABLE_SHARE_RDZV_TCP_STORE switch exists
        # only as the workaround for its stale-bootstrap bug, which the per-round server here does not have.
        return True

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
        return RendezvousInfo(
            store,
            info.rank,
            info.world_size,
            RendezvousStoreInfo(master_addr=info.master_addr, master_port=info.master_port),
        )

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
            raise _connect_error(
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
            raise _connect_error(
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


# ---------------------------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------------------------


def create_handler(params: RendezvousParameters, *, graceful_exit: str = "exit") -> FsRendezvousHandler:
    """Build the torchrun handler from torch's parameters (what ``--rdzv-backend=fsrdzv`` runs).

    :raises ValueError: (``fsrdzv.ConfigurationError``) an unknown ``--rdzv-conf`` key, a malformed value, or an
        invalid endpoint or run id; the message names the key and the value.
    """
    config = parse_config(params)
    ports = PortReservation()
    try:
        core = _core_create_handler(
            config.endpoint,
            config.run_id,
            config.min_nodes,
            config.max_nodes,
            port_factory=ports.reserve,
            **config.handler_kwargs(),
        )
    except fe.ConfigurationError:
        raise  # already a ValueError with a message that names the setting
    except fe.RendezvousError as exc:
        raise _to_torch(exc) from exc
    return FsRendezvousHandler(core, store_timeout=config.store_timeout, graceful_exit=graceful_exit, ports=ports)


def handler_creator() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """The ``torchrun.handlers`` entry point: torch calls it with no arguments and registers what it returns."""
    return create_handler
