"""File-level helpers of the directory store: bounded reads that survive NFS's ESTALE, envelope headers,
error translation, and the listing of runs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable
from typing import Final, TypeVar

from .._errors import StorageError
from .._retry import Retry
from .._store import MAX_DOCUMENT_BYTES, record_hash

__all__ = [
    "list_file_runs",
    "map_os_error",
    "newest_mtime",
    "not_hidden",
    "parse_envelope",
    "read_file",
    "retry_stale",
    "version_of",
]

#: Attempts of a read that NFS answers with ESTALE (the file was replaced under the handle: reopening finds it).
STALE_RETRIES: Final = 20
_STALE_RETRY: Final = Retry(delay=0.005, max_delay=0.05, backoff=1.5, label="read after ESTALE")
_T = TypeVar("_T")

_ERRNO_HINTS: Final = {
    errno.ENOSPC: "the file system is full; free space or use another endpoint",
    errno.EDQUOT: "the disk quota is exceeded; free space or use another endpoint",
    errno.EROFS: "the file system is mounted read-only; use a writable shared directory",
    errno.EACCES: "check the directory's owner and mode (or set permissions='group')",
    errno.EPERM: "operation not permitted; check the directory's owner and mode",
    errno.ENOENT: "a directory is missing; is the shared file system mounted on this node?",
    errno.ENOTDIR: "the endpoint (or a path under it) is a file; give a shared directory",
    errno.ESTALE: "stale NFS file handle persisted; check the NFS server",
    errno.EIO: "I/O error from the storage device or server",
}


def map_os_error(exc: OSError, what: str) -> StorageError:
    """Translate an OSError into a StorageError that says what failed, where, and what to do."""
    hint = _ERRNO_HINTS.get(exc.errno or 0, "check the storage")
    err = StorageError(exc.errno or 0, f"{what} failed: {exc.strerror or exc}; {hint}")
    err.__cause__ = exc
    return err


def retry_stale(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` again when NFS reports ESTALE (the file was replaced under an open handle)."""
    attempts = _STALE_RETRY.attempts()
    for _ in range(STALE_RETRIES - 1):
        try:
            return fn()
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
            attempts.pause()
    return fn()


def read_file(path: str, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """Read at most a little more than ``limit`` bytes: an oversized file is reported, never loaded whole."""

    def once() -> bytes:
        # os-level calls: open, fstat, read, close all succeed (a buffered open would also ask isatty(), a failed
        # ioctl on every read); the size bounds the read, so nothing past the limit is ever loaded.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            remaining = min(os.fstat(fd).st_size, limit + 4096)
            parts = []
            while remaining > 0:
                chunk = os.read(fd, remaining)
                if not chunk:
                    break
                parts.append(chunk)
                remaining -= len(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    return retry_stale(once)


def not_hidden(name: bytes) -> bool:
    return not name.startswith(b".")


def parse_envelope(raw: bytes, verify: bool) -> tuple[int, str] | None:
    """Parse an envelope's header once: ``(generation, version)``, or None when it is damaged or foreign.

    ``verify`` also checks the payload against the header's sha256: the one hash of the document per read.
    Without it, the caller must leave that check to :func:`fsrdzv._store.unseal` (``Store.read`` does it) before
    anything trusts the version. The version hashes the header line only: once the payload matches the header's
    sha256, the header (generation, payload hash, HMAC) names the whole document, so hashing all of it again
    would only repeat the work.
    """
    end = raw.find(b"\n")
    if end < 0:
        return None
    head = raw[:end]
    generation: int | None = None
    digest: bytes | None = None
    for field in head.split(b" ")[1:]:
        if generation is None and field.startswith(b"gen="):
            try:
                generation = int(field[4:])
            except ValueError:
                return None
        elif digest is None and field.startswith(b"sha256="):
            digest = field[7:]
    if generation is None or digest is None:
        return None
    if verify and hashlib.sha256(memoryview(raw)[end + 1 :]).hexdigest().encode() != digest:
        return None  # truncated (a pruned log entry, or read while being truncated) or altered
    return generation, version_of(head)


def version_of(raw: bytes) -> str:
    return record_hash(raw)


def newest_mtime(path: str) -> float | None:
    """The newest modification time of any file under ``path`` (None: no file)."""
    newest: float | None = None
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                mtime = os.stat(os.path.join(root, name)).st_mtime
                newest = mtime if newest is None else max(newest, mtime)
    return newest


def list_file_runs(root: str) -> list[str]:
    """Run ids that have data under ``root``."""
    root = os.path.abspath(os.path.expanduser(root))
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise map_os_error(exc, f"listing {root}") from exc
    return sorted(
        e.name
        for e in entries
        if e.is_dir() and (os.path.exists(os.path.join(e.path, "state")) or os.path.isdir(os.path.join(e.path, "log")))
    )
