"""Local and shared file systems (local disk, tmpfs, NFS, Lustre, GPFS): a per-generation commit log.

Layout of one run (``<root>/<run_id>/``)::

    state                   the current document (a copy of the newest log entry; what readers open first)
    log/00000000000000000007  one immutable file per generation; created with link(2), which fails if it exists
    lock                    the filelock lock file
    records/<kind>/<name>   per-node records, replaced with rename(2)

Why a log: a lock on a shared file system can silently fail to exclude (NFS ``nolock``/``local_lock``, FUSE
mounts, Lustre ``localflock``), and then "lock, read, compare, rename" loses updates. Here the commit point is
``link(tmp, log/<gen+1>)``: link is atomic and exclusive across NFS clients (like ``O_EXCL``), so at most one
writer can ever commit each generation, whatever the lock does. The lock only keeps writers from wasting work.
Readers open ``state`` (close-to-open consistency: never ``stat`` for mtime) and then *roll forward* through
``log/<gen+1>`` ... so a writer that died between committing and publishing ``state`` loses nothing.

Old log entries are truncated to zero bytes rather than deleted: an existing empty file still blocks ``link``, so
a writer stalled for a long time can never re-commit an old generation (no ABA), while the disk space goes back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from typing import Final, TypeVar

import filelock

from .._errors import ConfigurationError, StorageError
from .._store import MAX_DOCUMENT_BYTES, MAX_RECORD_BYTES, ChangeWatch, Store
from ._notify import watch_directories

__all__ = ["FileStore", "list_file_runs", "map_os_error"]

log = logging.getLogger("fsrdzv.store.file")

#: How many recent log entries keep their content (older ones are truncated to free space).
KEEP_LOG_ENTRIES: Final = 64
#: Retries for the transient errors of shared file systems (ESTALE after a rename on NFS, ENOENT races).
_READ_RETRIES: Final = 20
_GEN_WIDTH: Final = 20
#: Seconds between attempts to take a contended lock. filelock's default (50 ms) leaves the lock idle for up to
#: 50 ms after each release while every waiter sleeps; a commit holds it for well under a millisecond locally, so a
#: waiter should retry soon after a release (a CAS that lost then learns it within ms and can retry: formation
#: latency). Each attempt is an open(2) + flock(2) (RPCs on NFS), hence not 0. The price: more wake-ups, and more
#: losers reaching the lock; with 8 busy writers on 2 CPUs benchmarks/cas_throughput.py counts fewer CAS/s overall
#: than with 50 ms, which let one writer run nearly alone while the others slept.
_LOCK_POLL_INTERVAL: Final = 0.002
_T = TypeVar("_T")

_ERRNO_HINTS: Final = {
    errno.ENOSPC: "the file system is full; free space or use another endpoint",
    errno.EDQUOT: "the disk quota is exceeded; free space or use another endpoint",
    errno.EROFS: "the file system is mounted read-only; use a writable shared directory",
    errno.EACCES: "permission denied; check the directory's owner and mode (or set permissions='group')",
    errno.EPERM: "operation not permitted; check the directory's owner and mode",
    errno.ENOENT: "a directory is missing; is the shared file system mounted on this node?",
    errno.ENOTDIR: "a path component is not a directory; check the endpoint",
    errno.ESTALE: "stale NFS file handle persisted; check the NFS server",
    errno.EIO: "I/O error from the storage device or server",
}


def map_os_error(exc: OSError, what: str) -> StorageError:
    """Translate an OSError into a StorageError that says what failed, where, and what to do."""
    hint = _ERRNO_HINTS.get(exc.errno or 0, "check the storage")
    err = StorageError(exc.errno or 0, f"{what} failed: {exc.strerror or exc}; {hint}")
    err.__cause__ = exc
    return err


def _retry_stale(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` again when NFS reports ESTALE (the file was replaced under an open handle)."""
    for attempt in range(_READ_RETRIES):
        try:
            return fn()
        except OSError as exc:
            if exc.errno != errno.ESTALE or attempt == _READ_RETRIES - 1:
                raise
            time.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _read_file(path: str, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """Read at most a little more than ``limit`` bytes: an oversized file is reported, never loaded whole."""

    def once() -> bytes:
        with open(path, "rb") as f:
            return f.read(limit + 4096)

    return _retry_stale(once)


def _not_hidden(name: bytes) -> bool:
    return not name.startswith(b".")


def _envelope(raw: bytes, verify: bool) -> tuple[int, str] | None:
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
    return generation, _version(head)


def _version(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


_TRUE: Final = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE: Final = frozenset({"0", "false", "f", "no", "n", "off"})


def _option_bool(name: str, value: object, root: str) -> bool:
    # Options arrive as strings from the CLI and --rdzv-conf: "false" must not be truthy.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"storage option {name}={value!r} for {root} is not a boolean (use true or false)")


def _option_seconds(name: str, value: object, root: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(value, bool) or not seconds > 0 or seconds == float("inf"):
        raise ConfigurationError(f"storage option {name}={value!r} for {root} must be a positive number of seconds")
    return seconds


class FileStore(Store):
    """A run's document and records in a directory. See the module docstring for the commit protocol.

    :param root: the endpoint directory (created if its parent exists: a missing parent usually means the
        shared file system is not mounted, and silently using local disk would split the job).
    :param lock: use filelock to serialise writers (an optimisation; correctness does not depend on it).
    :param lock_timeout: seconds to wait for the lock before proceeding without it.
    :param permissions: ``"owner"`` (0600/0700, the default), ``"group"`` (0660/0770) or ``"world"`` (0644/0755).
    :param fsync: fsync each committed generation before it becomes visible.
    """

    enforces_conditions = True

    def __init__(
        self,
        root: str,
        run_id: str,
        *,
        secret: bytes | None = None,
        lock: bool = True,
        lock_timeout: float = 10.0,
        permissions: str = "owner",
        fsync: bool = True,
    ) -> None:
        root = os.path.abspath(os.path.expanduser(root))
        super().__init__(run_id, root, secret)
        lock = _option_bool("lock", lock, root)
        fsync = _option_bool("fsync", fsync, root)
        lock_timeout = _option_seconds("lock_timeout", lock_timeout, root)
        modes = {"owner": (0o600, 0o700), "group": (0o660, 0o770), "world": (0o644, 0o755)}
        if permissions not in modes:
            raise ConfigurationError(
                f"permissions={permissions!r} is not one of 'owner', 'group', 'world' (storage option of {root})"
            )
        self.file_mode, self.dir_mode = modes[permissions]
        self.root = root
        self.dir = os.path.join(root, run_id)
        self.state_path = os.path.join(self.dir, "state")
        self.log_dir = os.path.join(self.dir, "log")
        self.lock_path = os.path.join(self.dir, "lock")
        self.records_dir = os.path.join(self.dir, "records")
        self.use_lock = lock
        self.lock_timeout = lock_timeout
        self.fsync = fsync
        self._lock: filelock.BaseFileLock | None = None
        self._lock_warned = False
        self._dirs_ready = False
        self._host = socket.gethostname().replace(os.sep, "_")

    # -- helpers ---------------------------------------------------------------------------------------------

    def _log_path(self, generation: int) -> str:
        return os.path.join(self.log_dir, f"{generation:0{_GEN_WIDTH}d}")

    def _ensure_dirs(self) -> None:
        if self._dirs_ready:
            return
        try:
            if not os.path.isdir(self.root):
                parent = os.path.dirname(self.root)
                if not os.path.isdir(parent):
                    raise StorageError(
                        errno.ENOENT,
                        f"endpoint {self.root} does not exist and neither does its parent {parent}; "
                        "is the shared file system mounted on this node? (fsrdzv creates only the last level)",
                    )
                self._mkdir(self.root)
            for d in (self.dir, self.log_dir, self.records_dir):
                self._mkdir(d)
        except StorageError:
            raise
        except OSError as exc:
            raise map_os_error(exc, f"creating the run directory {self.dir}") from exc
        self._dirs_ready = True

    def _mkdir(self, path: str) -> None:
        try:
            os.mkdir(path, self.dir_mode)
        except FileExistsError:
            return
        # mkdir's mode is filtered by the umask; 'group' must really give the group access.
        os.chmod(path, self.dir_mode)

    def _write_temp(self, directory: str, raw: bytes, sync: bool) -> str:
        path = os.path.join(directory, f".tmp.{self._host}.{os.getpid()}.{secrets.token_hex(6)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        try:
            os.fchmod(fd, self.file_mode)  # the umask filtered the mode given to open
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.use_lock:
            yield
            return
        if self._lock is None:
            self._lock = filelock.FileLock(self.lock_path, timeout=self.lock_timeout, mode=self.file_mode)
        try:
            # Given to acquire(), which takes it in every filelock this package allows (>= 3.12).
            self._lock.acquire(poll_interval=_LOCK_POLL_INTERVAL)
        except (filelock.Timeout, OSError, NotImplementedError) as exc:
            # The lock is an optimisation: the exclusive link below keeps CAS correct without it.
            if not self._lock_warned:
                log.warning("lock %s unavailable (%s); continuing with link-based commits only", self.lock_path, exc)
                self._lock_warned = True
            yield
            return
        try:
            yield
        finally:
            self._lock.release()

    # -- document --------------------------------------------------------------------------------------------

    def _read_raw(self) -> tuple[bytes, str] | None:
        try:
            current = self._read_current(verify=False)  # Store.read unseals it: that checks the checksum
        except OSError as exc:
            raise map_os_error(exc, f"reading {self.state_path}") from exc
        return None if current is None else (current[0], current[1])

    def _read_current(self, verify: bool) -> tuple[bytes, str, int | None] | None:
        """The newest document as ``(raw, version, generation)``; generation None: damaged or foreign.

        With ``verify`` the returned document's checksum was checked here. Without it, a ``state`` that is the
        newest generation is returned unchecked, for the caller's ``unseal`` (one hash per read, not two); every
        log entry read and any ``state`` rolled forward from are still checked here, as before.
        """
        for _ in range(_READ_RETRIES):
            try:
                raw: bytes | None = _read_file(self.state_path)
            except FileNotFoundError:
                raw = None
            except NotADirectoryError:
                return None
            parsed: tuple[int, str] | None
            if raw is not None:
                parsed = _envelope(raw, verify)
                if parsed is None:
                    # Not ours or damaged: report it as it is (the base class raises StateCorruptError).
                    return raw, _version(raw), None
                generation = parsed[0]
            else:
                parsed, generation = None, 0
            latest, checked, ok = raw, verify, True
            while True:
                try:
                    nxt = _read_file(self._log_path(generation + 1))
                except (FileNotFoundError, NotADirectoryError):
                    break
                if raw is not None and not checked:
                    # Rolling forward: check ``state`` as a verified read would have (a damaged one is reported).
                    if _envelope(raw, True) is None:
                        return raw, _version(raw), None
                    checked = True
                entry = _envelope(nxt, True)
                if entry is None:
                    # A pruned (truncated) entry: ``state`` is far behind; fall back to the newest entry.
                    ok = False
                    break
                latest, parsed, generation = nxt, entry, generation + 1
            if not ok:
                found = self._newest_log_entry()
                if found is None:
                    continue
                latest, parsed = found
            if latest is None or parsed is None:
                return None
            return latest, parsed[1], parsed[0]
        return None

    def _newest_log_entry(self) -> tuple[bytes, tuple[int, str]] | None:
        try:
            names = sorted((n for n in os.listdir(self.log_dir) if n.isdigit()), reverse=True)
        except FileNotFoundError:
            return None
        for name in names[:4]:
            try:
                raw = _read_file(os.path.join(self.log_dir, name))
            except FileNotFoundError:
                continue
            parsed = _envelope(raw, True)
            if parsed is not None:
                return raw, parsed
        return None

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        self._ensure_dirs()
        try:
            with self._locked():
                current = self._read_current(verify=True)
                if expected is None:
                    if current is not None:
                        return None
                elif current is None or current[2] != expected[0] or current[1] != expected[1]:
                    return None  # stale token, or a damaged document (generation None: never overwritten)
                entry = self._write_temp(self.log_dir, raw, self.fsync)
                try:
                    # The commit point: exclusive across processes and NFS clients, lock or no lock.
                    os.link(entry, self._log_path(generation))
                except FileExistsError:
                    return None
                finally:
                    os.unlink(entry)
                # Committed. Publishing ``state`` is only a shortcut for readers (they roll forward through the
                # log), so a failure from here on must not turn a win into an error.
                try:
                    self._publish(raw, generation)
                except OSError as exc:
                    log.warning("generation %d of %s committed; 'state' not updated: %s", generation, self.dir, exc)
                self._prune(generation - KEEP_LOG_ENTRIES)
                return _version(raw[: raw.index(b"\n")])  # what _envelope gives readers of this entry
        except OSError as exc:
            raise map_os_error(exc, f"writing generation {generation} of {self.dir}") from exc

    def _publish(self, raw: bytes, generation: int) -> None:
        # A separate copy as ``state``, not a hard link: log entries are truncated later.
        published = self._write_temp(self.dir, raw, False)
        try:
            if os.path.exists(self._log_path(generation + 1)):
                return  # someone already built on our entry; never move ``state`` back
            os.replace(published, self.state_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(published)

    def _prune(self, generation: int) -> None:
        if generation < 1:
            return
        with contextlib.suppress(OSError):
            fd = os.open(self._log_path(generation), os.O_WRONLY | os.O_TRUNC)
            os.close(fd)

    # -- records ---------------------------------------------------------------------------------------------

    def _kind_dir(self, kind: str) -> str:
        if not kind.isidentifier():
            raise ConfigurationError(f"record kind {kind!r} must be an identifier")
        return os.path.join(self.records_dir, kind)

    def _put_record(self, kind: str, name: str, raw: bytes) -> None:
        self._ensure_dirs()
        directory = self._kind_dir(kind)
        try:
            self._mkdir(directory)
            tmp = self._write_temp(directory, raw, False)
            os.replace(tmp, os.path.join(directory, name))
        except OSError as exc:
            raise map_os_error(exc, f"writing record {kind}/{name} in {self.dir}") from exc

    def _read_record(self, kind: str, name: str) -> bytes | None:
        try:
            return _read_file(os.path.join(self._kind_dir(kind), name), MAX_RECORD_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise map_os_error(exc, f"reading record {kind}/{name} in {self.dir}") from exc

    def _list_records(self, kind: str) -> dict[str, str]:
        directory = self._kind_dir(kind)
        out: dict[str, str] = {}
        try:
            names = [n for n in os.listdir(directory) if not n.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return out
        except OSError as exc:
            raise map_os_error(exc, f"listing records {kind} in {self.dir}") from exc
        for name in names:
            # Open and read (close-to-open revalidation on NFS) instead of trusting cached attributes.
            try:
                out[name] = _version(_read_file(os.path.join(directory, name), MAX_RECORD_BYTES))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise map_os_error(exc, f"reading record {kind}/{name} in {self.dir}") from exc
        return out

    def _delete_record(self, kind: str, name: str) -> None:
        try:
            os.unlink(os.path.join(self._kind_dir(kind), name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise map_os_error(exc, f"deleting record {kind}/{name} in {self.dir}") from exc

    def delete_run(self) -> None:
        try:
            shutil.rmtree(self.dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise map_os_error(exc, f"deleting {self.dir}") from exc
        self._dirs_ready = False

    def change_watch(self, kinds: tuple[str, ...] = (), document: bool = True) -> ChangeWatch | None:
        # Every commit creates log/<generation> (link(2)): watching that directory wakes waiters on this host.
        # A record appears, or is replaced, by rename(2) under its own name; temporary files start with a dot.
        try:
            self._ensure_dirs()
            paths: list[tuple[str, Callable[[bytes], bool]]] = [(self.log_dir, bytes.isdigit)] if document else []
            for kind in kinds:
                directory = self._kind_dir(kind)
                self._mkdir(directory)
                paths.append((directory, _not_hidden))
        except (StorageError, OSError):
            return None
        return watch_directories(paths)

    def sibling(self, run_id: str) -> FileStore:
        return FileStore(
            self.root,
            run_id,
            secret=self._secret,
            lock=self.use_lock,
            lock_timeout=self.lock_timeout,
            permissions={0o600: "owner", 0o660: "group"}.get(self.file_mode, "world"),
            fsync=self.fsync,
        )

    def corrupt_for_tests(self, raw: bytes) -> None:
        """Overwrite ``state`` and the newest log entry with raw bytes (conformance tests)."""
        self._ensure_dirs()
        current = self._read_current(verify=False)
        with open(self.state_path, "wb") as f:
            f.write(raw)
        if current is not None:
            generation = current[2]
            if generation is not None:
                with open(self._log_path(generation), "wb") as f:
                    f.write(raw)


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
