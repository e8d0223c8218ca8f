"""The storage contract: one compare-and-set document per run, plus small per-node records.

Every store keeps, for one run id:

* **the document** — opaque bytes guarded by a token. :meth:`Store.compare_and_set` writes only when the caller's
  token is current, and it always says whether *its own* write won (torch's c10d backend cannot).
* **records** — small objects each node writes for itself (heartbeats, join requests), listed in one call.
  Nodes never contend on records, so keep-alives never rewrite the shared document.

Stored bytes are wrapped in a one-line envelope ``fsrdzv1 gen=<n> sha256=<hex>[ hmac=<hex>]`` followed by the
payload. The envelope gives every store a monotonic generation of its own (S3 ETags repeat for equal bodies, GCS
generations are not ordered), detects truncated or foreign objects, and carries the optional HMAC of a job secret.

Tokens are opaque strings ``"<generation>:<version>"`` where the version is the store's own precondition value
(a content hash for files and memory, an ETag for S3 and Azure, an object generation for GCS). Any other value —
wrong type, wrong format, stale — makes a CAS return ``won=False`` with the current snapshot, without raising.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac as _hmac
import logging
import re
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final, Protocol

from ._errors import ConfigurationError, StateCorruptError, TamperedError, UnsupportedStoreError

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_RECORD_BYTES",
    "CasResult",
    "ChangeWatch",
    "Snapshot",
    "Store",
    "decode_name",
    "encode_name",
    "seal",
    "unseal",
    "validate_run_id",
]

#: Largest document payload accepted on write or read (bytes). 10,000 nodes take about 3.3 MB.
MAX_DOCUMENT_BYTES: Final = 32 * 1024 * 1024
#: Largest per-node record payload (bytes).
MAX_RECORD_BYTES: Final = 64 * 1024

log = logging.getLogger("fsrdzv.store")

_MAGIC: Final = b"fsrdzv1"
_RUN_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SAFE_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_")


class ChangeWatch(Protocol):
    """Returned by :meth:`Store.change_watch`."""

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True if it returned early because the document changed."""

    def close(self) -> None:
        """Release the watch."""


@dataclass(frozen=True)
class Snapshot:
    """The document as read: its payload, the token to CAS against, and its monotonic generation."""

    data: bytes
    token: str
    generation: int = 0


@dataclass(frozen=True)
class CasResult:
    """Outcome of :meth:`Store.compare_and_set`.

    ``won`` says whether this call's write took effect. ``snapshot`` is the document after the call: the new one
    when ``won``, otherwise the current one (``None`` if no document exists).
    """

    won: bool
    snapshot: Snapshot | None


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is safe as a path and object-key component, else raise ConfigurationError."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id) or run_id in {".", ".."}:
        raise ConfigurationError(
            f"invalid run id {run_id!r}: use 1-128 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (for example $SLURM_JOB_ID)"
        )
    return run_id


def encode_name(name: str) -> str:
    """Escape a record name (a node id) so that it can never leave its folder: ``%XX`` for unsafe bytes."""
    if not name:
        raise ConfigurationError("a record name must not be empty")
    out = []
    for ch in name:
        if ch in _SAFE_NAME_CHARS:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    encoded = "".join(out)
    if encoded.startswith("."):
        # "." and ".." and hidden temp files are reserved for the stores themselves.
        encoded = "%2E" + encoded[1:]
    return encoded


def decode_name(encoded: str) -> str:
    """Inverse of :func:`encode_name`."""
    raw = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "%" and i + 2 < len(encoded):
            raw.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(encoded[i].encode())
            i += 1
    return raw.decode()


def _mac(secret: bytes, generation: int, payload: bytes) -> str:
    return _hmac.new(secret, b"%d\n" % generation + payload, hashlib.sha256).hexdigest()


def seal(payload: bytes, generation: int, secret: bytes | None = None) -> bytes:
    """Wrap ``payload`` in the envelope (generation, checksum and optional HMAC)."""
    header = b"%s gen=%d sha256=%s" % (_MAGIC, generation, hashlib.sha256(payload).hexdigest().encode())
    if secret is not None:
        header += b" hmac=" + _mac(secret, generation, payload).encode()
    return header + b"\n" + payload


def unseal(raw: bytes, where: str, secret: bytes | None = None, limit: int = MAX_DOCUMENT_BYTES) -> tuple[int, bytes]:
    """Check an envelope and return ``(generation, payload)``.

    :raises StateCorruptError: empty, truncated, foreign or oversized data (``where`` names the object).
    :raises TamperedError: a job secret is configured and the HMAC is missing or wrong.
    """
    hint = "inspect it with 'fsrdzv status', then replace it with 'fsrdzv reset --force' if it is garbage"
    if not raw:
        raise StateCorruptError(f"{where} is empty; {hint}")
    if len(raw) > limit + 512:
        raise StateCorruptError(f"{where} is {len(raw)} bytes, over the {limit}-byte limit; {hint}")
    head, sep, payload = raw.partition(b"\n")
    fields = head.split(b" ")
    if not sep or fields[0] != _MAGIC:
        raise StateCorruptError(f"{where} is not an fsrdzv document (no 'fsrdzv1' header); {hint}")
    values: dict[bytes, bytes] = {}
    for field in fields[1:]:
        key, eq, value = field.partition(b"=")
        if eq:
            values[key] = value
    try:
        generation = int(values[b"gen"])
        digest = values[b"sha256"].decode()
    except (KeyError, ValueError, UnicodeDecodeError):
        raise StateCorruptError(f"{where} has a malformed header {head[:80]!r}; {hint}") from None
    if hashlib.sha256(payload).hexdigest() != digest:
        raise StateCorruptError(f"{where} is truncated or altered (checksum mismatch); {hint}")
    if secret is not None:
        mac = values.get(b"hmac")
        if mac is None or not _hmac.compare_digest(mac, _mac(secret, generation, payload).encode()):
            raise TamperedError(
                f"{where} is not signed with this job's secret (missing or wrong HMAC); it was ignored. "
                "Check that every node uses the same secret_file, or look for a foreign writer."
            )
    return generation, payload


def _parse_token(token: object) -> tuple[int, str] | None:
    if not isinstance(token, str):
        return None
    gen_text, sep, version = token.partition(":")
    if not sep or not (gen_text.isascii() and gen_text.isdigit()):
        return None
    return int(gen_text), version


class Store(ABC):
    """One run's document and records on some storage. Use :func:`fsrdzv.open_store` to get one.

    Subclasses implement the raw operations; this base class owns the envelope, the token format, validation and
    the contract that a CAS never raises for a bad token and always reports whether its own write won.
    """

    #: True for the built-in stores: the directory and memory stores enforce conditions in fsrdzv's own code,
    #: and the object stores self-test the service when they are opened. Wrappers and third-party stores are
    #: probed by :meth:`verify_conditions` before a handler trusts them.
    enforces_conditions: bool = False

    def __init__(self, run_id: str, location: str, secret: bytes | None = None) -> None:
        self.run_id = validate_run_id(run_id)
        #: Human-readable place of this run's data, used in error messages.
        self.location = location
        self._secret = secret

    # -- public contract -------------------------------------------------------------------------------------

    def read(self) -> Snapshot | None:
        """Return the current document, or ``None`` when there is none.

        :raises StateCorruptError: the stored object exists but is not a valid fsrdzv document.
        :raises StorageError: the storage failed.
        """
        got = self._read_raw()
        if got is None:
            return None
        raw, version = got
        generation, payload = unseal(raw, self.describe("document"), self._secret)
        return Snapshot(payload, f"{generation}:{version}", generation)

    def compare_and_set(self, data: bytes, token: object = None) -> CasResult:
        """Write ``data`` if ``token`` is current (``None``: only if no document exists).

        A stale, foreign or malformed token never writes and never raises: the result is ``won=False`` with
        the current snapshot. A current token writes and the result carries a new, different token.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"compare_and_set needs bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ConfigurationError(
                f"document of {len(data)} bytes exceeds the {MAX_DOCUMENT_BYTES}-byte limit for {self.location}"
            )
        if token is None:
            expected: tuple[int, str] | None = None
            generation = 1
        else:
            expected = _parse_token(token)
            if expected is None:
                return CasResult(False, self.read())
            generation = expected[0] + 1
        raw = seal(data, generation, self._secret)
        version = self._commit(raw, generation, expected)
        if version is None:
            return CasResult(False, self.read())
        return CasResult(True, Snapshot(data, f"{generation}:{version}", generation))

    def put_record(self, kind: str, name: str, data: bytes) -> None:
        """Create or overwrite this node's record ``name`` of ``kind`` (no contention: one writer per name)."""
        if len(data) > MAX_RECORD_BYTES:
            raise ConfigurationError(f"record of {len(data)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
        self._put_record(kind, encode_name(name), seal(data, 0, self._secret))

    def read_record(self, kind: str, name: str) -> bytes | None:
        """Return one record's payload, or ``None`` if it does not exist.

        :raises StateCorruptError: the record is not a valid envelope.
        :raises TamperedError: a job secret is set and the record is not signed with it.
        """
        raw = self._read_record(kind, encode_name(name))
        if raw is None:
            return None
        return unseal(raw, self.describe(f"record {kind}/{name}"), self._secret, MAX_RECORD_BYTES)[1]

    def list_records(self, kind: str) -> dict[str, str]:
        """Return ``{name: tag}`` for every record of ``kind``, in one listing.

        The tag is opaque and changes whenever the record is rewritten with new content, so an observer can tell
        whether a heartbeat advanced without reading it.
        """
        out = {}
        for key, tag in self._list_records(kind).items():
            try:
                out[decode_name(key)] = tag
            except (ValueError, UnicodeDecodeError):
                # A stray object that fsrdzv did not write: never let it break every node's listing.
                log.warning("ignoring %s: the name %r was not written by fsrdzv", self.describe(f"{kind} records"), key)
        return out

    def delete_record(self, kind: str, name: str) -> None:
        """Delete a record if it exists."""
        self._delete_record(kind, encode_name(name))

    @abstractmethod
    def delete_run(self) -> None:
        """Delete the document and every record of this run (used by ``fsrdzv gc`` and ``reset``)."""

    def reset(self, data: bytes) -> Snapshot:
        """Replace the document whatever it holds, even when it is unreadable. Only ``fsrdzv reset --force``."""
        generation = 1
        try:
            current = self.read()
        except StateCorruptError:
            current = None
        if current is not None:
            generation = current.generation + 1
        self.delete_run()
        # Keep the generation climbing across a reset so that no old token can ever match again.
        version = self._commit(seal(data, generation, self._secret), generation, None)
        if version is None:
            raise StateCorruptError(f"could not reset {self.location}: another writer created it concurrently")
        return Snapshot(data, f"{generation}:{version}", generation)

    def sibling(self, run_id: str) -> Store:
        """A store of another run at the same location with the same options (for self-tests)."""
        raise NotImplementedError(f"{type(self).__name__} cannot open sibling runs")

    def verify_conditions(self) -> None:
        """Check on a throw-away run that this store really refuses stale and duplicate conditional writes.

        Stores written for fsrdzv enforce conditions themselves, but a wrapper, proxy or third-party store may not;
        a store that ignores them would silently lose updates, so it is refused.

        :raises UnsupportedStoreError: a duplicate create or a stale-token write was accepted.
        """
        if self.enforces_conditions:
            return
        try:
            probe = self.sibling(f"fsrdzv-probe-{secrets.token_hex(6)}")
        except NotImplementedError:
            return
        try:
            first = probe.compare_and_set(b"probe-1", None)
            second = probe.compare_and_set(b"probe-2", None)
            stale_ok = False
            if first.won and first.snapshot is not None and not second.won:
                newer = probe.compare_and_set(b"probe-3", first.snapshot.token)
                stale_ok = newer.won and probe.compare_and_set(b"probe-4", first.snapshot.token).won
            if not first.won or second.won or stale_ok:
                raise UnsupportedStoreError(
                    f"{self.location} ignores conditional writes (a duplicate create or a stale compare-and-set "
                    "was accepted); fsrdzv would lose updates there. Use a store that honours them "
                    "(check it with 'fsrdzv doctor')"
                )
        finally:
            with contextlib.suppress(Exception):
                probe.delete_run()

    @property
    def signed(self) -> bool:
        """Whether a job secret is set (every object carries an HMAC that is checked on read)."""
        return self._secret is not None

    def change_watch(self, kinds: tuple[str, ...] = (), document: bool = True) -> ChangeWatch | None:
        """A way to sleep until the document (unless ``document`` is false), or a record of one of ``kinds``, may
        have changed; or None (the default: callers poll).

        Only a shortcut for latency: a watch may miss changes (another host's write on NFS), so callers still
        read at their normal poll period.
        """
        return None

    def name_mac(self, text: str) -> str | None:
        """Signature of a record name that carries data (an inline join request), or None without a job secret.

        128 bits of the HMAC keep names short enough for any file system.
        """
        if self._secret is None:
            return None
        return _hmac.new(self._secret, b"name\n" + text.encode(), hashlib.sha256).hexdigest()[:32]

    def describe(self, what: str) -> str:
        """Name an object of this store for error messages."""
        return f"the rendezvous {what} of run {self.run_id!r} at {self.location}"

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release resources (connections, file descriptors)."""

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

    @abstractmethod
    def _list_records(self, kind: str) -> dict[str, str]: ...

    @abstractmethod
    def _delete_record(self, kind: str, name: str) -> None: ...
