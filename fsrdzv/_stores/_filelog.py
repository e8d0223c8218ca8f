"""The directory store's commit log: ``state`` plus ``log/<generation>`` entries (see ``_file`` for the protocol).

:class:`CommitLog` holds the mechanics of one run's document on a file system: reading the newest generation
(``state`` first, then rolling forward through the log), committing a generation with ``link(2)``, publishing
``state`` and truncating old entries. The store around it owns the directories, the lock and the records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Final

from ._fileio import parse_envelope, read_file, version_of

__all__ = ["KEEP_LOG_ENTRIES", "CommitLog"]

log = logging.getLogger("fsrdzv.store.file")

#: How many recent log entries keep their content (older ones are truncated to free space).
KEEP_LOG_ENTRIES: Final = 64
#: Retries for the transient errors of shared file systems (ESTALE after a rename on NFS, ENOENT races).
_READ_RETRIES: Final = 20
_GEN_WIDTH: Final = 20
#: A reader looks for a log entry newer than every one it knows (the commit of a writer that died before publishing
#: ``state``, or a ``state`` moved back by an unlocked writer) when ``state`` changed since its previous read, and
#: otherwise at most this often (s): a lookup that finds nothing is a failed syscall (an RPC on NFS), so it is not
#: made on every read of a steady document. Writers never need it: their link(2) fails on an existing entry.
PROBE_PERIOD: Final = 30.0


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else assumed to filter everything."""
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    return 0o777


#: The newest document as ``(raw, version, generation)``; generation None: damaged or foreign.
Current = tuple[bytes, str, "int | None"]


class CommitLog:
    """The document of the run in ``directory``: ``state`` and the per-generation log under ``log/``."""

    def __init__(self, directory: str, file_mode: int, fsync: bool) -> None:
        self.dir = directory
        self.state_path = os.path.join(directory, "state")
        self.log_dir = os.path.join(directory, "log")
        self.file_mode = file_mode
        self.fsync = fsync
        self._host = socket.gethostname().replace(os.sep, "_")
        #: Bits of a new file's mode that the umask removes (then fchmod restores the mode asked for).
        self._umask = _umask()
        #: The highest generation this process saw in the log (entries up to it exist: reading them never fails).
        self._known = 0
        #: The header of ``state`` at the previous read, and when a reader last looked past the known entries.
        self._state_head: bytes | None = None
        self._probed_at = -float("inf")

    def entry_path(self, generation: int) -> str:
        return os.path.join(self.log_dir, f"{generation:0{_GEN_WIDTH}d}")

    def write_temp(self, directory: str, raw: bytes, sync: bool) -> str:
        """A new hidden file in ``directory`` holding ``raw`` (fsync'd with ``sync``); its path."""
        path = os.path.join(directory, f".tmp.{self._host}.{os.getpid()}.{secrets.token_hex(6)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        try:
            if self.file_mode & self._umask:
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

    # -- reading -------------------------------------------------------------------------------------------

    def read_current(self, verify: bool, probe: bool | None = None) -> Current | None:
        """The newest document as ``(raw, version, generation)``; generation None: damaged or foreign.

        With ``verify`` the returned document's checksum was checked here. Without it, a ``state`` that is the
        newest generation is returned unchecked, for the caller's ``unseal`` (one hash per read, not two); every
        log entry read and any ``state`` rolled forward from are still checked here, as before. ``probe``: whether
        to look for a log entry newer than every one known now (None: when ``state`` changed, and otherwise once
        per PROBE_PERIOD).
        """
        for _ in range(_READ_RETRIES):
            try:
                raw: bytes | None = read_file(self.state_path)
            except FileNotFoundError:
                raw = None
            except NotADirectoryError:
                return None
            parsed: tuple[int, str] | None = None
            if raw is not None:
                parsed = parse_envelope(raw, verify)
                if parsed is None:
                    # Not ours or damaged: report it as it is (the base class raises StateCorruptError).
                    return raw, version_of(raw), None
            look = self._probe_due(raw) if probe is None else probe
            rolled = self._roll_forward(raw, parsed, verify, look)
            if rolled is None:
                # A pruned (truncated) entry: ``state`` is far behind; fall back to the newest entry.
                found = self._newest_entry()
                if found is None:
                    continue
                return found[0], found[1][1], found[1][0]
            latest, parsed, damaged = rolled
            if latest is None:
                return None
            if damaged or parsed is None:
                return latest, version_of(latest), None
            return latest, parsed[1], parsed[0]
        return None

    def _probe_due(self, raw: bytes | None) -> bool:
        """A reader looks past the known entries when ``state`` changed since its previous read (a writer may
        have died between its commit and publishing), else at most once per PROBE_PERIOD."""
        head = None if raw is None else raw[: raw.find(b"\n")]
        changed, self._state_head = head != self._state_head, head
        return changed or time.monotonic() - self._probed_at >= PROBE_PERIOD

    def _roll_forward(
        self, raw: bytes | None, parsed: tuple[int, str] | None, checked: bool, probe: bool
    ) -> tuple[bytes | None, tuple[int, str] | None, bool] | None:
        """Follow ``log/<gen+1>`` ... from ``state``: ``(newest raw, its envelope, state damaged)``, or None at a
        pruned entry. Without ``probe`` it stops at the newest entry known to exist."""
        latest, generation = raw, 0 if parsed is None else parsed[0]
        self._known = max(self._known, generation)
        while True:
            if generation >= self._known:
                if not probe:
                    return latest, parsed, False
                self._probed_at = time.monotonic()
            try:
                nxt = read_file(self.entry_path(generation + 1))
            except (FileNotFoundError, NotADirectoryError):
                self._known = generation  # (lower only when the run was deleted and begun again)
                return latest, parsed, False
            if raw is not None and not checked:
                # Rolling forward: check ``state`` as a verified read would have (a damaged one is reported).
                if parse_envelope(raw, True) is None:
                    return raw, None, True
                checked = True
            entry = parse_envelope(nxt, True)
            if entry is None:
                return None
            latest, parsed, generation = nxt, entry, generation + 1
            self._known = max(self._known, generation)

    def _newest_entry(self) -> tuple[bytes, tuple[int, str]] | None:
        try:
            names = sorted((n for n in os.listdir(self.log_dir) if n.isdigit()), reverse=True)
        except FileNotFoundError:
            return None
        for name in names[:4]:
            try:
                raw = read_file(os.path.join(self.log_dir, name))
            except FileNotFoundError:
                continue
            parsed = parse_envelope(raw, True)
            if parsed is not None:
                return raw, parsed
        return None

    def highest_generation(self) -> int:
        # Every generation ever committed left log/<generation> (old ones truncated, never deleted).
        try:
            return max((int(n) for n in os.listdir(self.log_dir) if n.isdigit()), default=0)
        except OSError:
            return 0

    # -- writing -------------------------------------------------------------------------------------------

    def commit(
        self,
        raw: bytes,
        generation: int,
        expected: tuple[int, str] | None,
        locked: Callable[[], AbstractContextManager[bool]],
    ) -> str | None:
        """Write ``raw`` as ``generation`` iff the document is ``expected`` (see ``SealedStore._commit``).

        ``locked`` is the store's writer lock, yielding whether it is held (an optimisation: ``link(2)`` is the
        commit point). A token that is already stale loses before the lock is taken, and the log entry is written
        before it too, so the lock covers only the check, the link and publishing. OSErrors propagate for the
        store to translate.
        """
        if self._stale(expected):
            return None
        entry = self.write_temp(self.log_dir, raw, self.fsync)
        try:
            with locked() as held:
                # No lookup past the known entries: the link below fails on any newer one.
                current = self.read_current(verify=True, probe=False)
                if expected is None:
                    if current is not None:
                        return None
                elif current is None or current[2] != expected[0] or current[1] != expected[1]:
                    return None  # stale token, or a damaged document (generation None: never overwritten)
                try:
                    # The commit point: exclusive across processes and NFS clients, lock or no lock.
                    os.link(entry, self.entry_path(generation))
                except FileExistsError:
                    self._known = max(self._known, generation)  # the next read rolls forward to it
                    return None
                self._known = max(self._known, generation)
                # Committed. Publishing ``state`` is only a shortcut for readers (they roll forward through the
                # log), so a failure from here on must not turn a win into an error.
                try:
                    self._publish(raw, generation, held)
                except OSError as exc:
                    log.warning("generation %d of %s committed; 'state' not updated: %s", generation, self.dir, exc)
                self._prune(generation - KEEP_LOG_ENTRIES)
                return version_of(raw[: raw.index(b"\n")])  # what _envelope gives readers of this entry
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry)

    def _stale(self, expected: tuple[int, str] | None) -> bool:
        """Whether ``state`` alone shows that ``expected`` lost: it exists for a create, or it is at or past the
        expected generation and another document. (A ``state`` behind it says nothing: the log decides.)"""
        try:
            seen = self.read_current(verify=False, probe=False)
        except OSError:
            return False  # the locked check reports it
        if seen is None:
            return False
        if expected is None:
            return True
        return seen[2] is not None and seen[2] >= expected[0] and (seen[2], seen[1]) != expected

    def _publish(self, raw: bytes, generation: int, held: bool) -> None:
        # A separate copy as ``state``, not a hard link: log entries are truncated later.
        published = self.write_temp(self.dir, raw, False)
        try:
            # Under a lock that excludes, nobody can have built on our entry yet; without one, never move
            # ``state`` back over a newer entry.
            if not held and os.path.exists(self.entry_path(generation + 1)):
                return
            os.replace(published, self.state_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(published)

    def _prune(self, generation: int) -> None:
        if generation < 1:
            return
        with contextlib.suppress(OSError):
            fd = os.open(self.entry_path(generation), os.O_WRONLY | os.O_TRUNC)
            os.close(fd)
