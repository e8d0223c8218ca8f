"""The storage contract: one compare-and-set document per run, plus small per-node records.

Every store keeps, for one run id:

* **the document** — opaque bytes guarded by a token. :meth:`Store.compare_and_set` writes only when the caller's
  token is current, and it always says whether *its own* write won (torch's c10d backend cannot).
* **records** — small objects each node writes for itself (heartbeats, join requests), listed in one call.
  Nodes never contend on records, so keep-alives never rewrite the shared document.

Three layers: :class:`Store` is the public interface everything else uses; :class:`SealedStore` implements it
once over a few raw operations, wrapping stored bytes in the envelope of :mod:`fsrdzv._envelope` (generation,
checksum, optional HMAC); ``_storewrap.StoreWrapper`` delegates every public method to another store, so that a wrapper
that injects faults, latency or counting never sees the envelope and can never drop the signature.

Tokens are opaque strings ``"<generation>:<version>"`` where the version is the store's own precondition value
(a content hash for files and memory, an ETag for S3 and Azure, an object generation for GCS). Any other value —
wrong type, wrong format, stale — makes a CAS return ``won=False`` with the current snapshot, without raising.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from abc import ABC, abstractmethod
from typing import Final

from ._envelope import (
    MAX_DOCUMENT_BYTES,
    MAX_RECORD_BYTES,
    decode_name,
    encode_name,
    name_signature,
    parse_token,
    seal,
    unseal,
    validate_run_id,
)
from ._errors import ConfigurationError, StateCorruptError
from ._storecheck import verify_on_sibling
from ._storetypes import NOT_MODIFIED, CasResult, ChangeWatch, NotModified, Snapshot, StoreCapabilities

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_RECORD_BYTES",
    "NOT_MODIFIED",
    "CasResult",
    "ChangeWatch",
    "NotModified",
    "SealedStore",
    "Snapshot",
    "Store",
    "StoreCapabilities",
    "decode_name",
    "encode_name",
    "record_hash",
    "seal",
    "unseal",
    "validate_run_id",
]

log = logging.getLogger("fsrdzv.store")


def record_hash(data: bytes) -> str:
    """A short hash of stored bytes, as a tag where the storage gives none."""
    return hashlib.sha256(data).hexdigest()[:16]


def _digest(data: bytes | None) -> str | None:
    return None if data is None else record_hash(data)


class Store(ABC):
    """One run's document and records on some storage: the interface. Use :func:`fsrdzv.open_store` to get one.

    The built-in stores derive from :class:`SealedStore`; wrappers from :class:`StoreWrapper`.
    """

    #: True for the built-in stores: the directory and memory stores enforce conditions in fsrdzv's own code,
    #: and the object stores self-test the service when they are opened. Wrappers and third-party stores are
    #: probed by :meth:`verify_conditions` before a handler trusts them.
    enforces_conditions: bool = False
    #: The answer of :meth:`read_if_changed` for an unchanged document.
    NOT_MODIFIED: Final = NOT_MODIFIED

    def __init__(self, run_id: str, location: str) -> None:
        self.run_id = validate_run_id(run_id)
        #: Human-readable place of this run's data, used in error messages.
        self.location = location

    @abstractmethod
    def read(self) -> Snapshot | None:
        """Return the current document, or ``None`` when there is none.

        :raises StateCorruptError: the stored object exists but is not a valid fsrdzv document.
        :raises StorageError: the storage failed.
        """

    def read_if_changed(self, token: object) -> Snapshot | NotModified | None:
        """:attr:`NOT_MODIFIED` if the document is still the one of ``token``, else what :meth:`read` returns.

        Object stores ask the storage (``If-None-Match`` / ``ifGenerationNotMatch``: an unchanged document costs a
        request without a body); this default reads the document and compares.
        """
        snap = self.read()
        return NOT_MODIFIED if snap is not None and token is not None and snap.token == token else snap

    @abstractmethod
    def compare_and_set(self, data: bytes, token: object = None) -> CasResult:
        """Write ``data`` if ``token`` is current (``None``: only if no document exists).

        A stale, foreign or malformed token never writes and never raises: the result is ``won=False`` with
        the current snapshot. A current token writes and the result carries a new, different token.
        """

    @abstractmethod
    def put_record(self, kind: str, name: str, data: bytes) -> None:
        """Create or overwrite this node's record ``name`` of ``kind`` (no contention: one writer per name)."""

    @abstractmethod
    def read_record(self, kind: str, name: str) -> bytes | None:
        """Return one record's payload, or ``None`` if it does not exist.

        :raises StateCorruptError: the record is not a valid envelope.
        :raises TamperedError: a job secret is set and the record is not signed with it.
        """

    def record_tag(self, kind: str, name: str) -> str | None:
        """A tag of one record (None: there is none) that changes whenever it is rewritten, without its payload
        where the storage can (S3, Azure: HEAD; GCS: the generation; a directory: one open); only comparable with
        this method's tags. Unverified: with a job secret, read the record to trust a change. Default: a read."""
        return _digest(self.read_record(kind, name))

    def record_digest(self, payload: bytes) -> str | None:
        """The MD5 (hex) of the bytes a record holding ``payload`` is stored as (its envelope, signed with this
        store's secret), to compare with a content tag (``StoreCapabilities.content_tags``); None: unknown."""
        return None

    @abstractmethod
    def list_records(self, kind: str) -> dict[str, str]:
        """Return ``{name: tag}`` for every record of ``kind``, in one listing.

        The tag is opaque and changes whenever the record is rewritten with new content, so an observer can tell
        whether a heartbeat advanced without reading it.
        """

    @abstractmethod
    def delete_record(self, kind: str, name: str) -> None:
        """Delete a record if it exists."""

    @abstractmethod
    def delete_run(self) -> None:
        """Delete the document and every record of this run (used by ``fsrdzv gc`` and ``reset``)."""

    @abstractmethod
    def reset(self, data: bytes) -> Snapshot:
        """Replace the document whatever it holds, even when it is unreadable. Only ``fsrdzv reset --force``."""

    @property
    @abstractmethod
    def signed(self) -> bool:
        """Whether a job secret is set (every object carries an HMAC that is checked on read)."""

    @abstractmethod
    def name_mac(self, text: str) -> str | None:
        """Signature of a record name that carries data (an inline join request), or None without a job secret."""

    def sibling(self, run_id: str) -> Store:
        """A store of another run at the same location with the same options (for self-tests)."""
        raise NotImplementedError(f"{type(self).__name__} cannot open sibling runs")

    def verify_conditions(self) -> None:
        """Check on a throw-away run that this store really refuses stale and duplicate conditional writes.

        Stores written for fsrdzv enforce conditions themselves, but a wrapper, proxy or third-party store may not;
        a store that ignores them would silently lose updates, so it is refused.

        :raises UnsupportedStoreError: a duplicate create or a stale-token write was accepted.
        """
        if not self.enforces_conditions:
            verify_on_sibling(self)

    def change_watch(self, kinds: tuple[str, ...] = (), document: bool = True) -> ChangeWatch | None:
        """A way to sleep until the document (unless ``document`` is false), or a record of one of ``kinds``, may
        have changed; or None (the default: callers poll).

        Only a shortcut for latency: a watch may miss changes (another host's write on NFS), so callers still
        read at their normal poll period.
        """
        return None

    @property
    def capabilities(self) -> StoreCapabilities:
        """What this store offers beyond the contract (see :class:`StoreCapabilities`)."""
        return StoreCapabilities()

    def highest_generation(self) -> int:
        """The highest generation this store ever wrote for the run, also where the document is unreadable (a
        directory's log); 0 if unknown. ``reset`` continues above it."""
        return 0

    def last_modified(self) -> float | None:
        """Wall-clock time (epoch seconds, the storage's clock) of the newest object of this run, or None if
        unknown or there is none."""
        return None

    def describe(self, what: str) -> str:
        """Name an object of this store for error messages."""
        return f"the rendezvous {what} of run {self.run_id!r} at {self.location}"

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release resources (connections, file descriptors)."""


class SealedStore(Store):
    """A store implemented over raw operations, with the envelope, the token format and validation done here.

    Subclasses implement ``_read_raw``, ``_commit``, the ``_*_record`` operations and ``delete_run``; this class
    keeps the contract that a CAS never raises for a bad token and always reports whether its own write won.
    """

    def __init__(self, run_id: str, location: str, secret: bytes | None = None) -> None:
        super().__init__(run_id, location)
        self._secret = secret

    def read(self) -> Snapshot | None:
        got = self._read_raw()
        if got is None:
            return None
        return self._snapshot(*got)

    def _snapshot(self, raw: bytes, version: str) -> Snapshot:
        """Unseal the stored document ``raw`` of store version ``version``."""
        generation, payload = unseal(raw, self.describe("document"), self._secret)
        return Snapshot(payload, f"{generation}:{version}", generation)

    def compare_and_set(self, data: bytes, token: object = None) -> CasResult:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"compare_and_set needs bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ConfigurationError(
                f"document of {len(data)} bytes exceeds the {MAX_DOCUMENT_BYTES}-byte limit for {self.location}"
            )
        expected = None if token is None else parse_token(token)
        if token is not None and expected is None:
            return CasResult(False, self.read())
        generation = 1 if expected is None else expected[0] + 1
        # Each write is unique (w=): a condition refused to the client library's own retry of a write whose answer
        # was lost (a read timeout, a dropped connection) is then recognised as this write, not a lost race.
        sealed = seal(data, generation, self._secret, secrets.token_hex(8))
        version = self._commit(sealed, generation, expected)
        if version is not None:
            return CasResult(True, Snapshot(data, f"{generation}:{version}", generation))
        got = self._read_raw()
        if got is not None and got[0] == sealed:
            return CasResult(True, Snapshot(data, f"{generation}:{got[1]}", generation))
        return CasResult(False, None if got is None else self._snapshot(*got))

    def put_record(self, kind: str, name: str, data: bytes) -> None:
        if len(data) > MAX_RECORD_BYTES:
            raise ConfigurationError(f"record of {len(data)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
        self._put_record(kind, encode_name(name), seal(data, 0, self._secret))

    def read_record(self, kind: str, name: str) -> bytes | None:
        raw = self._read_record(kind, encode_name(name))
        if raw is None:
            return None
        return unseal(raw, self.describe(f"record {kind}/{name}"), self._secret, MAX_RECORD_BYTES)[1]

    def record_tag(self, kind: str, name: str) -> str | None:
        return self._record_tag(kind, encode_name(name))

    def record_digest(self, payload: bytes) -> str | None:
        # Records are sealed as generation 0 (see put_record): the same payload always gives the same bytes.
        return hashlib.md5(seal(payload, 0, self._secret), usedforsecurity=False).hexdigest()

    def list_records(self, kind: str) -> dict[str, str]:
        out = {}
        for key, tag in self._list_records(kind).items():
            try:
                out[decode_name(key)] = tag
            except (ValueError, UnicodeDecodeError):
                # A stray object that fsrdzv did not write: never let it break every node's listing.
                log.warning("ignoring %s: the name %r was not written by fsrdzv", self.describe(f"{kind} records"), key)
        return out

    def delete_record(self, kind: str, name: str) -> None:
        self._delete_record(kind, encode_name(name))

    def reset(self, data: bytes) -> Snapshot:
        try:
            current = self.read()
        except StateCorruptError:
            current = None
        generation = max(1 if current is None else current.generation + 1, self.highest_generation() + 1)
        self.delete_run()
        # Keep the generation climbing across a reset so that no old token can ever match again.
        version = self._commit(seal(data, generation, self._secret), generation, None)
        if version is None:
            raise StateCorruptError(f"could not reset {self.location}: another writer created it concurrently")
        return Snapshot(data, f"{generation}:{version}", generation)

    @property
    def signed(self) -> bool:
        return self._secret is not None

    def name_mac(self, text: str) -> str | None:
        return None if self._secret is None else name_signature(self._secret, text)

    # -- what a store implements -----------------------------------------------------------------------------

    @abstractmethod
    def _read_raw(self) -> tuple[bytes, str] | None:
        """Return the stored envelope bytes and the store's version string, or None."""

    @abstractmethod
    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        """Write ``raw`` as generation ``generation`` iff the current document matches ``expected``.

        ``expected`` is ``(generation, version)`` from the caller's token, or None for create-if-absent.
        Return the new version string on success, or None when the precondition does not hold.
        """

    @abstractmethod
    def _put_record(self, kind: str, name: str, raw: bytes) -> None: ...

    @abstractmethod
    def _read_record(self, kind: str, name: str) -> bytes | None: ...

    def _record_tag(self, kind: str, name: str) -> str | None:
        """The store's tag of one record without its body; this default hashes what ``_read_record`` returns."""
        return _digest(self._read_record(kind, name))

    @abstractmethod
    def _list_records(self, kind: str) -> dict[str, str]: ...

    @abstractmethod
    def _delete_record(self, kind: str, name: str) -> None: ...
