"""``fsrdzv.safe_point()``: a worker says "restarting me now loses nothing" (after a checkpoint, or every step).

Torch-free and cheap, so that it can be called every step. Under an agent with ``scale_up_at=safe_point`` (``fsrdzv
run --scale-up-at safe_point`` or torchrun's ``--rdzv-conf scale_up_at=safe_point``) it finds the run from the
variables the agent sets for its workers (``FSRDZV_ENDPOINT``, ``FSRDZV_RUN_ID``, ``FSRDZV_ROUND``,
``FSRDZV_NODE_ID``, ``FSRDZV_SAFE_POINT_FILE``, with ``FSRDZV_STORAGE_OPTIONS`` and ``FSRDZV_SECRET_FILE`` as
elsewhere). It writes this node's ``sp`` record only while the agent holds a newcomer back (the agent's flag file
exists), at most once per call and once per :data:`MIN_INTERVAL`; otherwise it costs one ``stat``. Only the
process with ``LOCAL_RANK`` 0 writes: one record per node. Outside such an agent it does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Final

from ._environ import storage_options_from_env
from ._errors import ConfigurationError, RendezvousError
from ._scaleup import SAFE_POINT_KIND
from ._secret import job_secret
from ._store import Store
from ._stores import open_store, split_endpoint

__all__ = ["MIN_INTERVAL", "safe_point"]

log = logging.getLogger("fsrdzv")

#: At most one safe-point write per this many seconds per process, however often it is called.
MIN_INTERVAL: Final = 0.5
#: Seconds between two warnings about failed safe-point writes.
WARN_INTERVAL: Final = 30.0
#: The agent's flag file: it exists while a safe point is wanted.
FLAG_ENV: Final = "FSRDZV_SAFE_POINT_FILE"


class _Marker:
    """This process's safe-point record writer for one run and node."""

    def __init__(self, store: Store, node_id: str) -> None:
        self.store = store
        self.node_id = node_id
        self.count = 0
        self.last = -float("inf")
        self.last_warning = -float("inf")

    def mark(self, round_: int) -> bool:
        now = time.monotonic()
        if now - self.last < MIN_INTERVAL:
            return False
        self.last = now
        self.count += 1
        body = {"round": round_, "count": self.count, "pid": os.getpid()}
        try:
            self.store.put_record(SAFE_POINT_KIND, self.node_id, json.dumps(body).encode())
        except RendezvousError as exc:  # a missed safe point only delays a scale-up; training goes on
            if now - self.last_warning >= WARN_INTERVAL:
                self.last_warning = now
                log.warning("fsrdzv.safe_point: cannot record the safe point (will retry): %s", exc)
            return False
        return True


_lock = threading.Lock()
_markers: dict[tuple[str, ...], _Marker] = {}


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ConfigurationError(
            f"fsrdzv.safe_point: {FLAG_ENV} is set but {name} is not; start the program with fsrdzv run or "
            "torchrun --rdzv-backend=fsrdzv and keep their environment"
        )
    return value


def _marker(environ: Mapping[str, str]) -> _Marker:
    endpoint = _required(environ, "FSRDZV_ENDPOINT")
    run_id = _required(environ, "FSRDZV_RUN_ID")
    node_id = _required(environ, "FSRDZV_NODE_ID")
    key = (endpoint, run_id, node_id, environ.get("FSRDZV_STORAGE_OPTIONS", ""), environ.get("FSRDZV_SECRET_FILE", ""))
    marker = _markers.get(key)
    if marker is None:
        options = storage_options_from_env(environ)
        if split_endpoint(endpoint)[0] not in ("file", "memory"):
            # The agent checked the service when it joined; a worker's record needs no second self-test.
            options.setdefault("skip_selftest", True)
        secret = job_secret(environ.get("FSRDZV_SECRET_FILE") or None)
        store = open_store(endpoint, run_id, storage_options=options, secret=secret)
        marker = _markers[key] = _Marker(store, node_id)
    return marker


def _round(environ: Mapping[str, str]) -> int:
    text = _required(environ, "FSRDZV_ROUND")
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(f"fsrdzv.safe_point: FSRDZV_ROUND={text!r} is not an integer") from None


def safe_point() -> bool:
    """Mark a safe point of this node: a waiting newcomer may make the round re-form now without losing work.

    Call it after each checkpoint (or every step: it is cheap). Returns True if this call recorded a safe point,
    False if none was needed (no newcomer held back, not the node's ``LOCAL_RANK`` 0, called again within
    :data:`MIN_INTERVAL`, or not under an agent with ``scale_up_at=safe_point``) or the storage failed (logged).

    :raises ConfigurationError: the agent's variables are incomplete or malformed (the message names them).
    """
    environ = os.environ
    flag = environ.get(FLAG_ENV)
    if not flag or environ.get("LOCAL_RANK", "0").strip() not in ("", "0") or not os.path.exists(flag):
        return False
    with _lock:
        return _marker(environ).mark(_round(environ))
