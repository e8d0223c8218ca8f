"""``lock``: a lock held by another process must exclude this one, and be free once released."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Final

from .._store import Store
from ._check import LOCK_PROBE, LOCK_WATCHDOG, Check

__all__ = ["check_lock"]

#: The other process of the lock check: take the lock, say so, hold it until told to let go.
_LOCK_HOLDER: Final = (
    "import sys\n"
    "path, mode = sys.argv[1], sys.argv[2]\n"
    "lock = None\n"
    "if mode == 'filelock':\n"
    "    import filelock\n"
    "    lock = filelock.FileLock(path, timeout=10)\n"
    "    lock.acquire()\n"
    "sys.stdout.write('held\\n')\n"
    "sys.stdout.flush()\n"
    "sys.stdin.readline()\n"
    "if lock is not None:\n"
    "    lock.release()\n"
)


@contextlib.contextmanager
def _try_lock(path: str, mode: str, timeout: float) -> Iterator[bool]:
    """Yield whether this process got the lock within ``timeout`` (a no-op lock always "gets" it)."""
    if mode != "filelock":
        yield True
        return
    import filelock

    lock = filelock.FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def check_lock(store: Store) -> Check:
    lock_path = store.capabilities.lock_path
    if lock_path is None:
        return Check("lock", "skip", "not a directory endpoint: object stores need no lock (CAS only)")
    mode = "filelock" if store.capabilities.uses_lock else "none"
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, lock_path, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    # A lock call can hang for good on a broken NFS lock manager (NFSv3 without statd): never wait forever.
    watchdog = threading.Timer(LOCK_WATCHDOG, holder.kill)
    watchdog.start()
    try:
        line = holder.stdout.readline()
        if line.strip() != b"held":
            err = holder.communicate(timeout=10)[1].decode(errors="replace").strip().splitlines()
            return Check(
                "lock", "fail", f"another process could not take the lock on {lock_path}: {err[-1] if err else '?'}"
            )
        with _try_lock(lock_path, mode, LOCK_PROBE) as got:
            excluded = not got
        holder.stdin.write(b"release\n")
        holder.stdin.flush()
        holder.wait(timeout=10)
        with _try_lock(lock_path, mode, 5.0) as got:
            free_again = got
    finally:
        watchdog.cancel()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for stream in (holder.stdin, holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
    details = {"lock_file": lock_path, "lock": mode, "excluded": excluded, "free_after_release": free_again}
    if not excluded:
        why = (
            "the storage option lock=false turns the store's lock off"
            if mode == "none"
            else "the file system does not honour flock between descriptors"
        )
        return Check(
            "lock",
            "fail",
            f"a second descriptor took the lock on {lock_path} while another process held it: {why}. "
            "Commits stay atomic through link(2), but writers are no longer serialised",
            details,
        )
    if not free_again:
        return Check("lock", "fail", f"the lock on {lock_path} could not be taken even after it was released", details)
    return Check("lock", "pass", "a lock held by another process excluded this one and was free after release", details)
