"""What the object stores (S3, Azure Blob, GCS) share: key layout, records, compare-and-set, runs and the boundary.

:class:`ObjectStore` implements the :class:`~fsrdzv._store.Store` contract once, in terms of a few raw requests
that each store module provides in its SDK's own terms:

* ``_sdk_get(key, limit, unless)`` -> ``(body, version, size)`` (no body when ``size`` is over ``limit``; a
  ``304`` answer when the version is still ``unless``), ``_sdk_head(key)`` -> tag (the MD5 where the service
  gives it, else the version; no body), ``_sdk_put(key, data, create=..., match=...)`` -> new version,
  ``_sdk_list(prefix, delimiter)`` -> ``({key: tag}, [sub-prefixes])`` (all pages), ``_sdk_delete(key)``;
* ``_delete_many(keys)`` (batches, or a few threads) and ``_exist(keys)`` (for :meth:`ObjectStore.list_runs`);
* ``_translate(exc, what)``: the store's error mapping. It returns an :class:`ExpectedAnswerError` for the
  expected non-2xx answers (a condition that did not hold, a missing key) and a :class:`~fsrdzv.StorageError`
  (or a configuration error) for everything else.

The ``_sdk_*`` requests raise the SDK's own exceptions; they only ever run inside :meth:`ObjectStore._call`,
the one place where foreign exceptions are translated. Versions are the store's precondition values (ETags,
GCS generations) as strings.

Layout of one run::

    <prefix>/<run_id>/state                  the document: one object, written only with a condition
    <prefix>/<run_id>/records/<kind>/<name>  per-node records (plain overwrites; one writer per name)
    <prefix>/.fsrdzv-probe/<uuid>            short-lived objects of the start-up self-test
"""

from __future__ import annotations

import errno
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeVar

from .._envelope import ENVELOPE_SLACK, decode_name, oversized, parse_token
from .._errors import ConfigurationError, RendezvousError, StorageError
from .._settings import parse_seconds
from .._store import (
    MAX_DOCUMENT_BYTES,
    MAX_RECORD_BYTES,
    NOT_MODIFIED,
    NotModified,
    SealedStore,
    Snapshot,
    validate_run_id,
)
from .._storetypes import StoreCapabilities
from ._helpers import batches, check_options, in_threads
from ._keys import check_kind, join_key, split_rest
from ._selftest import PROBE_DIR, verify_conditional_writes

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "TIMEOUT_OPTIONS",
    "ExpectedAnswerError",
    "ObjectRequests",
    "ObjectStore",
    "batches",
    "check_options",
    "in_threads",
]

_T = TypeVar("_T")
_I = TypeVar("_I")

#: Seconds to establish a connection and to wait for the next bytes of an answer (the storage options
#: ``connect_timeout`` and ``read_timeout``, the same on every object store): well below the keep-alive interval,
#: so that a silently dropped connection fails a request within seconds, as a refused one does, instead of
#: holding the keep-alive or the launcher's loop for a minute.
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
DEFAULT_READ_TIMEOUT: Final = 2.0
TIMEOUT_OPTIONS: Final = frozenset({"connect_timeout", "read_timeout"})


class ExpectedAnswerError(Exception):
    """An expected non-2xx answer (a condition that did not hold, a missing key): raised by the boundary,
    handled by the requests of :class:`ObjectStore`, never seen outside a store."""

    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def missing(self) -> bool:
        """Nothing is stored at the key: a read returns None."""
        return False

    @property
    def nothing_to_delete(self) -> bool:
        """A delete of the key has nothing to do."""
        return self.missing

    @property
    def lost(self) -> bool:
        """The condition of a conditional write did not hold: a lost race, not an error."""
        return False

    @property
    def not_modified(self) -> bool:
        """A conditional read found the object unchanged (304: no body)."""
        return self.status == 304

    @property
    def summary(self) -> str:
        """The answer in an error message: ``412 ConditionNotMet``."""
        return f"{self.status} {self.code}"


class ObjectRequests:
    """The raw requests a store module provides in its SDK's terms, and the requests built on them: the one
    boundary where foreign exceptions are translated."""

    service: ClassVar[str]

    @property
    @abstractmethod
    def where(self) -> str:
        """The location and the endpoint or account it is on, for messages."""

    # -- what a store provides -------------------------------------------------------------------------------

    @abstractmethod
    def _translate(self, exc: Exception, what: str) -> Exception:
        """The exception to raise for a foreign one: an :class:`ExpectedAnswerError` or a :class:`RendezvousError`."""

    @abstractmethod
    def _sdk_get(self, key: str, limit: int, unless: str | None) -> tuple[bytes, str, int]:
        """Download ``key``: its body, the version of exactly that body, and its size. An object of more than
        ``limit`` bytes is not downloaded (empty body, its size). With ``unless``, the storage answers 304 (an
        ExpectedAnswerError that is ``not_modified``) when the version is still ``unless``."""

    @abstractmethod
    def _sdk_head(self, key: str) -> str:
        """``key``'s MD5 (hex) where its metadata gives it, else its version: no body (missing: ``missing``)."""

    @abstractmethod
    def _sdk_put(self, key: str, data: bytes, *, create: bool, match: str | None) -> str:
        """Upload ``data`` to ``key``: only if absent (``create``), only if its version is ``match``, or
        unconditionally (neither). Return the new version."""

    @abstractmethod
    def _sdk_list(self, prefix: str, delimiter: str) -> tuple[dict[str, str], list[str]]:
        """Every key under ``prefix`` with its tag (as :meth:`_sdk_head`'s; all pages), and the sub-prefixes."""

    @abstractmethod
    def _sdk_delete(self, key: str) -> None:
        """Delete ``key``."""

    @abstractmethod
    def _delete_many(self, keys: list[str]) -> None:
        """Delete every key of ``keys`` (in batches where the service has them); missing keys are fine."""

    @abstractmethod
    def _sdk_modified(self, prefix: str) -> list[float]:
        """Modification times (epoch seconds) of every object under ``prefix``."""

    @abstractmethod
    def _exist(self, keys: list[str]) -> list[bool]:
        """Whether each key exists (translated: call through :meth:`_call`)."""

    # -- the boundary ----------------------------------------------------------------------------------------

    def _call(self, what: str, op: Callable[[], _T]) -> _T:
        """Run one request; translate every foreign exception (the one place the object stores do so)."""
        try:
            return op()
        except RendezvousError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: everything foreign is translated here
            raise self._translate(exc, what) from None

    def _unexpected(self, answer: ExpectedAnswerError, what: str) -> StorageError:
        """An :class:`ExpectedAnswerError` that the request at hand does not expect."""
        return StorageError(
            errno.EIO, f"{self.service} {what} at {self.where} failed: unexpected HTTP {answer.summary}"
        )

    # -- requests --------------------------------------------------------------------------------------------

    def _get(
        self, key: str, what: str, where: str, limit: int, unless: str | None = None
    ) -> tuple[bytes, str] | NotModified | None:
        """Body and version of ``key``; None when it does not exist; NOT_MODIFIED when its version is ``unless``.

        :raises StateCorruptError: the object is larger than ``limit`` allows (``where`` names it); it is not read.
        """
        try:
            body, version, size = self._call(what, lambda: self._sdk_get(key, limit + ENVELOPE_SLACK, unless))
        except ExpectedAnswerError as answer:
            if answer.missing:
                return None
            if answer.not_modified and unless is not None:
                return NOT_MODIFIED
            raise self._unexpected(answer, what) from None
        if size > limit + ENVELOPE_SLACK:
            raise oversized(where, size, limit)
        return body, version

    def _head(self, key: str, what: str) -> str | None:
        try:
            return self._call(what, lambda: self._sdk_head(key))
        except ExpectedAnswerError as answer:
            if answer.missing:
                return None
            raise self._unexpected(answer, what) from None

    def _put(self, key: str, data: bytes, what: str, *, create: bool = False, match: str | None = None) -> str | None:
        """Write ``data`` (see :meth:`_sdk_put`); return the new version, or None when a condition did not hold."""
        try:
            return self._call(what, lambda: self._sdk_put(key, data, create=create, match=match))
        except ExpectedAnswerError as answer:
            if answer.lost and (create or match is not None):
                return None
            raise self._unexpected(answer, what) from None

    def _delete(self, key: str, what: str) -> None:
        try:
            self._call(what, lambda: self._sdk_delete(key))
        except ExpectedAnswerError as answer:
            if not answer.nothing_to_delete:
                raise self._unexpected(answer, what) from None

    def _list(self, prefix: str, what: str, delimiter: str = "") -> tuple[dict[str, str], list[str]]:
        try:
            return self._call(what, lambda: self._sdk_list(prefix, delimiter))
        except ExpectedAnswerError as answer:
            raise self._unexpected(answer, what) from None


class ObjectStore(SealedStore, ObjectRequests):
    """A run's document and records as objects under ``<prefix>/<run_id>/`` of a bucket or container."""

    enforces_conditions = True  # checked against the service by the self-test at open

    #: The service in messages ("S3"), the scheme of its locations ("s3"), and its conditions in messages.
    service: ClassVar[str]
    scheme: ClassVar[str]
    conditions: ClassVar[str]
    #: The storage options the store takes (None: the SDK validates them).
    known_options: ClassVar[frozenset[str] | None] = None

    def __init__(
        self,
        rest: str,
        run_id: str,
        *,
        storage_options: dict[str, Any] | None = None,
        secret: bytes | None = None,
    ) -> None:
        bucket, prefix = split_rest(rest, self.scheme)
        bucket = self._parse_bucket(bucket)
        super().__init__(run_id, f"{self.scheme}://" + join_key(bucket, prefix), secret)
        self.prefix = prefix
        self.state_key = join_key(prefix, run_id, "state")
        self.records_prefix = join_key(prefix, run_id, "records") + "/"
        self.run_prefix = join_key(prefix, run_id) + "/"
        options = dict(storage_options or {})
        if self.known_options is not None:
            check_options(options, self.known_options, self.location)
        skip_selftest = bool(options.pop("skip_selftest", False))
        source = f"storage option of {self.location}"
        #: Seconds to connect, and to wait for the next bytes of an answer, per request.
        self.connect_timeout = parse_seconds(
            "connect_timeout", options.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT), source=source
        )
        self.read_timeout = parse_seconds(
            "read_timeout", options.pop("read_timeout", DEFAULT_READ_TIMEOUT), source=source
        )
        endpoint = self._connect(bucket, options)
        if not skip_selftest:
            verify_conditional_writes(
                self,
                cache_key=(self.scheme, endpoint, bucket, prefix),
                prefix=prefix,
                location=self.where,
                conditions=self.conditions,
            )

    def _parse_bucket(self, bucket: str) -> str:
        """The bucket or container name in ``bucket`` as the endpoint writes it."""
        return bucket

    @abstractmethod
    def _connect(self, bucket: str, options: dict[str, Any]) -> str | None:
        """Set up the client for ``bucket``; return the endpoint it talks to (the self-test's cache key)."""

    # -- the store -------------------------------------------------------------------------------------------

    def _could_match(self, version: str) -> bool:
        """Whether ``version`` (from a token) can be a version of this store at all."""
        return bool(version)

    def _read_raw(self) -> tuple[bytes, str] | None:
        got = self._get(self.state_key, "read of the document", self.describe("document"), MAX_DOCUMENT_BYTES)
        assert got is not NOT_MODIFIED  # only a conditional read answers so
        return got

    def read_if_changed(self, token: object) -> Snapshot | NotModified | None:
        # If-None-Match / ifGenerationNotMatch: an unchanged document is answered 304, without its body.
        expected = parse_token(token)
        if expected is None or not self._could_match(expected[1]):
            return self.read()
        what, where = "conditional read of the document", self.describe("document")
        got = self._get(self.state_key, what, where, MAX_DOCUMENT_BYTES, unless=expected[1])
        if got is None or got is NOT_MODIFIED:
            return got
        snap = self._snapshot(*got)
        # A store that ignores the condition (an emulator, a proxy) sent the body: it may still be the same.
        return NOT_MODIFIED if snap.token == token else snap

    @property
    def capabilities(self) -> StoreCapabilities:
        return StoreCapabilities(conditional_read=True, content_tags=True)

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        what = f"conditional write of generation {generation}"
        if expected is None:
            return self._put(self.state_key, raw, what, create=True)
        if not self._could_match(expected[1]):
            return None  # a foreign token can never match
        return self._put(self.state_key, raw, what, match=expected[1])

    def _record_key(self, kind: str, name: str) -> str:
        return f"{self.records_prefix}{check_kind(kind)}/{name}"

    def _put_record(self, kind: str, name: str, raw: bytes) -> None:
        self._put(self._record_key(kind, name), raw, f"write of record {kind}/{name}")

    def _read_record(self, kind: str, name: str) -> bytes | None:
        where = self.describe(f"record {kind}/{decode_name(name)}")
        got = self._get(self._record_key(kind, name), f"read of record {kind}/{name}", where, MAX_RECORD_BYTES)
        assert got is not NOT_MODIFIED
        return None if got is None else got[0]

    def _record_tag(self, kind: str, name: str) -> str | None:
        # From the metadata alone (no body): the MD5 of the bytes where given (StoreCapabilities.content_tags).
        return self._head(self._record_key(kind, name), f"tag of record {kind}/{name}")

    def _list_records(self, kind: str) -> dict[str, str]:
        # One paginated listing; the versions are the tags (they change on every write), so no record is read.
        prefix = f"{self.records_prefix}{check_kind(kind)}/"
        objects, _ = self._list(prefix, f"listing of records {kind}", delimiter="/")
        # Names are escaped and never contain "/"; anything deeper is not a record of this kind.
        return {key[len(prefix) :]: tag for key, tag in objects.items() if "/" not in key[len(prefix) :]}

    def _delete_record(self, kind: str, name: str) -> None:
        self._delete(self._record_key(kind, name), f"delete of record {kind}/{name}")

    def delete_run(self) -> None:
        objects, _ = self._list(self.run_prefix, "listing of the run")
        self._delete_many(sorted(objects))

    def last_modified(self) -> float | None:
        try:
            times = self._call("listing of the run's object times", lambda: self._sdk_modified(self.run_prefix))
        except (ExpectedAnswerError, StorageError):
            return None  # the age is optional information: unknown
        return max(times) if times else None

    # -- self-test operations (see _selftest) ----------------------------------------------------------------

    def probe_create(self, key: str, data: bytes) -> str | None:
        return self._put(key, data, "self-test create", create=True)

    def probe_update(self, key: str, data: bytes, version: str) -> str | None:
        return self._put(key, data, "self-test update", match=version)

    def probe_delete(self, key: str) -> None:
        self._delete(key, "self-test delete")

    # -- runs ------------------------------------------------------------------------------------------------

    @classmethod
    def list_runs(cls, rest: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
        """Run ids under ``rest`` that hold a document: one delimited listing, then one check per run."""
        options = dict(storage_options or {})
        options["skip_selftest"] = True  # listing only reads
        # Any valid run id opens the store; it only borrows the client and the boundary.
        opener: Callable[..., ObjectStore] = cls
        store = opener(rest, "list-runs", storage_options=options)
        try:
            return store.runs_with_documents()
        finally:
            store.close()

    def runs_with_documents(self) -> list[str]:
        """Run ids next to this one (under the same prefix) that hold a document."""
        base = self.prefix + "/" if self.prefix else ""
        _, prefixes = self._list(base, "listing of runs", delimiter="/")
        candidates = []
        for name in (p[len(base) :].rstrip("/") for p in prefixes):
            if name == PROBE_DIR:
                continue
            try:
                candidates.append(validate_run_id(name))
            except ConfigurationError:
                continue
        found = self._exist([join_key(self.prefix, run_id, "state") for run_id in candidates])
        return sorted(r for r, ok in zip(candidates, found, strict=True) if ok)
