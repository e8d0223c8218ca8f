"""Wake a waiting node as soon as a new document generation is committed in a local directory (Linux inotify).

A waiting node polls the document; on a local disk a poll costs little, but the poll period (60 ms) is most of the
time between the completing write and the last node holding its rank. With inotify the node sleeps until a commit
log entry appears, then reads once. This is only a shortcut: inotify sees changes made through this kernel only, so
on NFS, Lustre or GPFS a change made by another host wakes nobody and the node reads at its normal poll period.
Any failure (not Linux, no inotify instances left, the directory vanished) falls back to plain sleeping.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import struct
import sys
import time
from collections.abc import Callable
from typing import Final

__all__ = ["DirectoryWatch", "watch_directories"]

log = logging.getLogger("fsrdzv.store")

_IN_CREATE: Final = 0x100
_IN_MOVED_TO: Final = 0x80
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0o2000000)
_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


class DirectoryWatch:
    """An inotify watch on directories: :meth:`wait` returns early when an entry that matters appears in one.

    ``relevant`` maps each watch descriptor to the test of an entry name (log entries are named by digits;
    records by anything but the stores' hidden temporary names).
    """

    def __init__(self, fd: int, relevant: dict[int, Callable[[bytes], bool]]) -> None:
        self._fd = fd
        self._relevant = relevant

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; return True as soon as a new generation was committed."""
        stop = time.monotonic() + timeout
        while True:
            left = stop - time.monotonic()
            if left <= 0 or self._fd < 0:
                if left > 0:
                    time.sleep(left)
                return False
            try:
                ready, _, _ = select.select([self._fd], [], [], left)
            except (OSError, ValueError):  # closed under us: sleep out the rest
                self._fd = -1
                continue
            if ready and self._drain():
                return True

    def _drain(self) -> bool:
        """Read the pending events; True if one names a log entry (digits only; temporary files do not count)."""
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            self._fd = -1
            return False
        found, offset = False, 0
        while offset + _EVENT.size <= len(data):
            wd, _, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            test = self._relevant.get(wd)
            found |= test is not None and test(name)
            offset += _EVENT.size + length
        return found

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def watch_directories(paths: list[tuple[str, Callable[[bytes], bool]]]) -> DirectoryWatch | None:
    """One watch over several directories, each with its test of entry names; None where inotify is unavailable."""
    libc = _load_libc()
    if libc is None:
        return None
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        log.debug("inotify unavailable (errno %d): polling only", ctypes.get_errno())
        return None
    relevant = {}
    for path, test in paths:
        wd = libc.inotify_add_watch(fd, os.fsencode(path), _IN_CREATE | _IN_MOVED_TO)
        if wd < 0:
            log.debug("cannot watch %s (errno %d): polling only", path, ctypes.get_errno())
            os.close(fd)
            return None
        relevant[wd] = test
    return DirectoryWatch(fd, relevant)
