"""``clock``: the offset between this host's wall clock and the storage's."""

from __future__ import annotations

import contextlib
import os
import secrets
import time

from .._store import Store
from ._check import CLOCK_TOLERANCE, Check

__all__ = ["check_clock_directory", "check_clock_store"]


def _clock_verdict(offset: float, uncertainty: float, basis: str) -> Check:
    details = {"offset_seconds": round(offset, 3), "uncertainty_seconds": round(uncertainty, 3), "basis": basis}
    text = f"storage clock {offset:+.3f}s from this host (±{uncertainty:.3f}s, {basis})"
    if abs(offset) > CLOCK_TOLERANCE + uncertainty:
        return Check(
            "clock",
            "warn",
            text + ": liveness is unaffected (fsrdzv never compares clocks), but idle ages in list/gc are off by "
            "that much; check NTP on this host and the storage server",
            details,
        )
    return Check("clock", "pass", text, details)


def check_clock_directory(directory: str) -> Check:
    probe = os.path.join(directory, f".clock-probe-{secrets.token_hex(4)}")
    before = time.time()
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"clock probe")
        os.fsync(fd)
        after = time.time()
        mtime = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    # The file system stamps with a coarse clock (a few ms), hence the uncertainty floor.
    return _clock_verdict(mtime - (before + after) / 2, max((after - before) / 2, 0.01), "file mtime")


def check_clock_store(store: Store) -> Check:
    """Write a record of the scratch run and compare the time the store gives it with this host's clock."""
    before = time.time()
    try:
        store.put_record("hb", "doctor-clock", b"clock probe")
    except Exception as exc:  # noqa: BLE001 - the clock check is optional; report why it could not run
        return Check("clock", "skip", f"cannot write a probe object to {store.location}: {exc}")
    after = time.time()
    # The probe is the newest object of the scratch run.
    mtime = store.last_modified()
    with contextlib.suppress(Exception):
        store.delete_record("hb", "doctor-clock")
    if mtime is None:
        return Check("clock", "skip", "the object store reports no modification time")
    # LastModified has one-second resolution (truncated), so the object can look up to 1 s older than it is.
    return _clock_verdict(mtime - (before + after) / 2 + 0.5, (after - before) / 2 + 0.5, "object LastModified")
