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
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Final

import filelock

from .._envelope import ENVELOPE_SLACK, decode_name, oversized, parse_token
from .._errors import ConfigurationError, StorageError
from .._settings import parse_bool, parse_seconds
from .._store import (
    MAX_DOCUMENT_BYTES,
    MAX_RECORD_BYTES,
    NOT_MODIFIED,
    ChangeWatch,
    NotModified,
    SealedStore,
    Snapshot,
    StoreCapabilities,
)
from ._fileio import map_os_error, newest_mtime, not_hidden, read_file, retry_stale, version_of
from ._filelog import KEEP_LOG_ENTRIES, CommitLog, Current
from ._keys import check_kind
from ._notify import watch_directories

__all__ = ["KEEP_LOG_ENTRIES", "FileStore"]

log = logging.getLogger("fsrdzv.store.file")

#: After finding the lock held, a writer commits without trying it for this long (s): under contention a try
#: costs more than the lost link(2) it would save on a local file system.
_CONTENDED_SKIP: Final = 0.05


class _WriterLock:
    """The store's one filelock object, taken with one try (see :meth:`held`)."""

    def __init__(self, path: str, use: bool, timeout: float, mode: int) -> None:
        self.path, self.use, self.timeout, self.mode = path, use, timeout, mode
        self._lock: filelock.BaseFileLock | None = None
        self._warned = False
        self._skip_until = 0.0

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """Hold the writer lock, yielding whether it is held (it is only an optimisation)."""
        if not self.use or time.monotonic() < self._skip_until:
            yield False
            return
        if self._lock is None:
            self._lock = filelock.FileLock(self.path, timeout=self.timeout, mode=self.mode)
        try:
            # One try, no queue: a writer that finds the lock held commits through link(2) alone (filelock
            # polls, so a queue of writers would wait a poll interval at every hand-over), and skips the lock
            # while writers contend.
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            self._skip_until = time.monotonic() + _CONTENDED_SKIP
            yield False
            return
        except (OSError, NotImplementedError) as exc:
            # The lock is an optimisation: the exclusive link keeps CAS correct without it.
            if not self._warned:
                log.warning("lock %s unavailable (%s); continuing with link-based commits only", self.path, exc)
                self._warned = True
            yield False
            return
        try:
            yield True
        finally:
            self._lock.release()


class FileStore(SealedStore):
    """A run's document and records in a directory. See the module docstring for the commit protocol.

    :param root: the endpoint directory (created if its parent exists: a missing parent usually means the
        shared file system is not mounted, and silently using local disk would split the job).
    :param lock: use filelock to serialise writers (an optimisation; correctness does not depend on it).
    :param lock_timeout: accepted for compatibility: a writer no longer waits for a held lock (it commits through
        link(2) at once).
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
        source = "storage option"
        lock = parse_bool("lock", lock, source=source)
        fsync = parse_bool("fsync", fsync, source=source)
        lock_timeout = parse_seconds("lock_timeout", lock_timeout, source=source)
        modes = {"owner": (0o600, 0o700), "group": (0o660, 0o770), "world": (0o644, 0o755)}
        if permissions not in modes:
            raise ConfigurationError(
                f"permissions={permissions!r} is not one of 'owner', 'group', 'world' (storage option of {root})"
            )
        self.file_mode, self.dir_mode = modes[permissions]
        self.root = root
        self.dir = os.path.join(root, run_id)
        self._log = CommitLog(self.dir, self.file_mode, fsync)
        self.state_path = self._log.state_path
        self.log_dir = self._log.log_dir
        self.lock_path = os.path.join(self.dir, "lock")
        self.records_dir = os.path.join(self.dir, "records")
        self.use_lock = lock
        self.lock_timeout = lock_timeout
        self.fsync = fsync
        self._writer_lock = _WriterLock(self.lock_path, lock, lock_timeout, self.file_mode)
        self._dirs_ready = False
        #: Record kinds whose directory this store made (or found) already.
        self._kinds: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _ensure_dirs(self) -> None:
        if self._dirs_ready:
            return
        try:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise StorageError(
                    errno.ENOTDIR, f"endpoint {self.root} is a file, not a directory; give a shared directory"
                )
            if not os.path.isdir(self.root):
                parent = os.path.dirname(self.root)
                if not os.path.isdir(parent):
                    raise StorageError(
                        errno.ENOENT,
                        f"endpoint {self.root} does not exist and neither does its parent {parent}; "
                        "is the shared file system mounted on this node? (fsrdzv creates only the last level)",
                    )
                _make_dir(self.root, self.dir_mode)
            for d in (self.dir, self.log_dir, self.records_dir):
                _make_dir(d, self.dir_mode)
        except StorageError:
            raise
        except OSError as exc:
            raise map_os_error(exc, f"creating the run directory {self.dir}") from exc
        self._dirs_ready = True

    def _locked(self) -> contextlib.AbstractContextManager[bool]:
        return self._writer_lock.held()

    # -- document --------------------------------------------------------------------------------------------

    def _read_raw(self) -> tuple[bytes, str] | None:
        current = self._current()
        return None if current is None else (current[0], current[1])

    def _current(self) -> Current | None:
        try:
            current = self._log.read_current(verify=False)  # Store.read unseals it: that checks the checksum
        except OSError as exc:
            raise map_os_error(exc, f"reading {self.state_path}") from exc
        if current is not None and len(current[0]) > MAX_DOCUMENT_BYTES + ENVELOPE_SLACK:
            raise oversized(self.describe("document"), _size(self.state_path, current[0]), MAX_DOCUMENT_BYTES)
        return current

    def read_if_changed(self, token: object) -> Snapshot | NotModified | None:
        # One read of ``state`` (no stat: close-to-open on NFS); an unchanged header needs no hash of the body.
        current = self._current()
        if current is None:
            return None
        expected = parse_token(token)
        if expected is not None and current[2] == expected[0] and current[1] == expected[1]:
            return NOT_MODIFIED
        return self._snapshot(current[0], current[1])

    def highest_generation(self) -> int:
        return self._log.highest_generation()

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        self._ensure_dirs()
        try:
            return self._log.commit(raw, generation, expected, self._locked)
        except OSError as exc:
            raise map_os_error(exc, f"writing generation {generation} of {self.dir}") from exc

    # -- records ---------------------------------------------------------------------------------------------

    def _kind_dir(self, kind: str) -> str:
        return os.path.join(self.records_dir, check_kind(kind))

    def _put_record(self, kind: str, name: str, raw: bytes) -> None:
        directory = self._kind_dir(kind)
        try:
            try:
                # The kind's directory is made once per store, not at every heartbeat (a failed mkdir each time).
                tmp = self._log.write_temp(self._ready_kind(kind, directory), raw, False)
            except FileNotFoundError:
                self._kinds.clear()  # the run was deleted meanwhile (gc, reset): make its directories again
                self._dirs_ready = False
                tmp = self._log.write_temp(self._ready_kind(kind, directory), raw, False)
            os.replace(tmp, os.path.join(directory, name))
        except OSError as exc:
            raise map_os_error(exc, f"writing record {kind}/{name} in {self.dir}") from exc

    def _ready_kind(self, kind: str, directory: str) -> str:
        self._ensure_dirs()
        if kind not in self._kinds:
            _make_dir(directory, self.dir_mode)
            self._kinds.add(kind)
        return directory

    def _read_record(self, kind: str, name: str) -> bytes | None:
        path = os.path.join(self._kind_dir(kind), name)
        try:
            raw = read_file(path, MAX_RECORD_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise map_os_error(exc, f"reading record {kind}/{name} in {self.dir}") from exc
        if len(raw) > MAX_RECORD_BYTES + ENVELOPE_SLACK:
            where = self.describe(f"record {kind}/{decode_name(name)}")
            raise oversized(where, _size(path, raw), MAX_RECORD_BYTES)
        return raw

    def _record_tag(self, kind: str, name: str) -> str | None:
        try:
            return retry_stale(lambda: _identity(os.path.join(self._kind_dir(kind), name)))
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
                out[name] = version_of(read_file(os.path.join(directory, name), MAX_RECORD_BYTES))
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
        self._kinds.clear()

    def change_watch(self, kinds: tuple[str, ...] = (), document: bool = True) -> ChangeWatch | None:
        # Every commit creates log/<generation> (link(2)): watching that directory wakes waiters on this host.
        # A record appears, or is replaced, by rename(2) under its own name; temporary files start with a dot.
        try:
            self._ensure_dirs()
            paths: list[tuple[str, Callable[[bytes], bool]]] = [(self.log_dir, bytes.isdigit)] if document else []
            for kind in kinds:
                directory = self._kind_dir(kind)
                _make_dir(directory, self.dir_mode)
                paths.append((directory, not_hidden))
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

    @property
    def capabilities(self) -> StoreCapabilities:
        return StoreCapabilities(directory=self.dir, lock_path=self.lock_path, uses_lock=self.use_lock, watch=True)

    def last_modified(self) -> float | None:
        return newest_mtime(self.dir)


def _identity(path: str) -> str:
    """The identity of the file at ``path``: open (close-to-open: NFS revalidates the attributes, which a bare
    stat may answer from its cache), fstat, close; nothing fails. A record is replaced by rename(2), so every
    write is a new inode with its own times."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return f"{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_ctime_ns:x}.{st.st_size:x}"


def _size(path: str, raw: bytes) -> int:
    """The size of an oversized file (read only up to the limit), for its error message."""
    try:
        return max(os.stat(path).st_size, len(raw))
    except OSError:
        return len(raw)


def _make_dir(path: str, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    # mkdir's mode is filtered by the umask; 'group' must really give the group access.
    os.chmod(path, mode)
