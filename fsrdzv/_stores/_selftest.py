"""The object stores' start-up check of conditional writes.

(The stores themselves share :class:`~fsrdzv._stores._object.ObjectStore`.)

Why a self-test: S3-compatible servers, proxies and emulators exist that accept ``If-None-Match``/``If-Match``
(or ``ifGenerationMatch``) and silently ignore them (npm s3rver, gcp-storage-emulator, proxies that drop
headers). On such an endpoint every compare-and-set "wins", two nodes both believe they own the same round, and
the job splits without any error. So before a store is used, it writes a probe object under the endpoint's prefix
and checks that a second create and a stale update are both refused. The verdict is cached per endpoint and
process: the check costs about five requests once, not per store.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Hashable
from typing import Final, Protocol

from .._errors import RendezvousError, UnsupportedStoreError
from ._keys import join_key

__all__ = ["PROBE_DIR", "ConditionalWrites", "clear_selftest_cache", "verify_conditional_writes"]

log = logging.getLogger("fsrdzv.store")

#: Folder (under the endpoint prefix) of the self-test's short-lived probe objects. It starts with a dot, which
#: no run id can, so probes never show up as runs.
PROBE_DIR: Final = ".fsrdzv-probe"

_PASSED: set[Hashable] = set()
_PASSED_LOCK = threading.Lock()


class ConditionalWrites(Protocol):
    """The three raw operations the self-test needs, in the store's own terms (versions are opaque strings)."""

    def probe_create(self, key: str, data: bytes) -> str | None:
        """Create ``key`` only if absent; return its version, or None when the store refused (it exists)."""

    def probe_update(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite ``key`` only if its version is ``version``; return the new version, or None when refused."""

    def probe_delete(self, key: str) -> None:
        """Delete ``key`` (no condition)."""


def verify_conditional_writes(
    store: ConditionalWrites,
    *,
    cache_key: Hashable,
    prefix: str,
    location: str,
    conditions: str,
) -> None:
    """Refuse an endpoint that ignores conditional writes; cached per ``cache_key`` once it passed.

    :param prefix: the key prefix under which the probe object is written (the endpoint's own prefix, where the
        credentials are most likely to allow writes).
    :param location: the endpoint, for messages.
    :param conditions: the names of the conditions, for messages (``"If-None-Match/If-Match"``).
    :raises UnsupportedStoreError: a second create or a stale update succeeded (the endpoint ignores conditions),
        or a fresh create or a current update was refused (it mishandles them).
    :raises StorageError: the probe could not be written at all (missing bucket, credentials, network).
    """
    with _PASSED_LOCK:
        if cache_key in _PASSED:
            return
    key = join_key(prefix, PROBE_DIR, uuid.uuid4().hex)
    # (lead, detail): "ignores" when a write that must fail succeeded, "mishandles" when a valid one was refused.
    failure: tuple[str, str] | None = None
    first = store.probe_create(key, b"fsrdzv probe 1\n")
    try:
        if first is None:
            # A fresh random key that "already exists" means creates are refused whatever the state.
            failure = ("mishandles", f"a create-if-absent of the new object {key} was refused")
        elif store.probe_create(key, b"fsrdzv probe 2\n") is not None:
            failure = ("ignores", "a second create-if-absent of the same object succeeded")
        else:
            second = store.probe_update(key, b"fsrdzv probe 3\n", first)
            if second is None:
                failure = ("mishandles", "an update carrying the object's current version was refused")
            elif store.probe_update(key, b"fsrdzv probe 4\n", first) is not None:
                failure = ("ignores", "an update carrying a stale version succeeded")
    finally:
        _delete_probe(store, key, location)
    if failure is not None:
        lead, detail = failure
        raise UnsupportedStoreError(
            f"{location}: this endpoint {lead} conditional writes ({conditions}): {detail}. fsrdzv cannot "
            "guarantee that only one node wins each update of the rendezvous state on it; use a store that "
            "honours them (AWS S3, Google Cloud Storage, Azure Blob Storage, or a shared directory)"
        )
    with _PASSED_LOCK:
        _PASSED.add(cache_key)


def _delete_probe(store: ConditionalWrites, key: str, location: str) -> None:
    try:
        store.probe_delete(key)
    except RendezvousError as exc:
        # Credentials that may write but not delete still give a correct store; leave the small probe behind.
        log.warning("could not delete the self-test probe %s at %s: %s", key, location, exc)


def clear_selftest_cache() -> None:
    """Forget every passed self-test (tests that need the check to run again)."""
    with _PASSED_LOCK:
        _PASSED.clear()
