"""The values the storage contract passes around: snapshots, CAS outcomes, capabilities, change watches."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal, Protocol

__all__ = ["NOT_MODIFIED", "CasResult", "ChangeWatch", "NotModified", "Snapshot", "StoreCapabilities"]


class _Answer(enum.Enum):
    NOT_MODIFIED = "not modified"


#: What :meth:`Store.read_if_changed` returns when the document is still the one the caller holds
#: (also ``Store.NOT_MODIFIED``).
NOT_MODIFIED: Final = _Answer.NOT_MODIFIED
NotModified = Literal[_Answer.NOT_MODIFIED]


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


@dataclass(frozen=True)
class StoreCapabilities:
    """What a store offers beyond the contract, for tools that check or show it (the defaults: nothing special)."""

    #: Local or shared directory that holds the run's data (the doctor checks its mount, lock and clock).
    directory: str | None = None
    #: The lock file that serialises the store's writers, if it has one.
    lock_path: str | None = None
    #: Whether the store takes that lock (the directory option ``lock``).
    uses_lock: bool = False
    #: Whether :meth:`Store.change_watch` may return a watch (else callers only poll).
    watch: bool = False
    #: Whether :meth:`Store.read_if_changed` asks the storage itself (a 304 answer carries no body) instead of
    #: reading the document and comparing.
    conditional_read: bool = False
    #: Whether record tags (:meth:`Store.record_tag`, :meth:`Store.list_records`) may be the MD5 (hex) of a
    #: record's stored bytes (S3's ETag, GCS's ``md5Hash``, Azure's Content-MD5): with a job secret, an observer
    #: then checks a heartbeat against the digest it predicts (:meth:`Store.record_digest`) instead of reading it.
    content_tags: bool = False
