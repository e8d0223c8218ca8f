"""``memory://NAME``: an in-process store shared by every store opened with that name, thread-safe.

It is the reference implementation of the contract (the simplest correct one) and the fast substrate of the
scale simulation. Spaces are kept per name in one process-wide registry guarded by a lock; nothing is shared
between processes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .._store import SealedStore, Snapshot, record_hash

__all__ = ["MemorySpace", "MemoryStore", "memory_space"]


@dataclass
class _Run:
    doc: bytes | None = None
    version: str = ""
    records: dict[str, dict[str, bytes]] = field(default_factory=dict)
    #: Wall-clock time of the newest write (document or record).
    modified: float | None = None
    #: The last document read, unsealed: ``(version, secret, snapshot)``. Thousands of simulated nodes poll the
    #: same large document; unsealing it once per version instead of once per read saves real CPU.
    unsealed: tuple[str, bytes | None, Snapshot] | None = None


class MemorySpace:
    """All runs under one ``memory://NAME``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, _Run] = {}

    def run(self, run_id: str) -> _Run:
        return self.runs.setdefault(run_id, _Run())


_SPACES: dict[str, MemorySpace] = {}
_SPACES_LOCK = threading.Lock()


def memory_space(name: str) -> MemorySpace:
    """Return the process-wide space called ``name``, creating it on first use."""
    with _SPACES_LOCK:
        return _SPACES.setdefault(name, MemorySpace())


def _version(raw: bytes) -> str:
    return record_hash(raw)


class MemoryStore(SealedStore):
    """A run's document and records in process memory."""

    enforces_conditions = True

    def __init__(self, name: str, run_id: str, secret: bytes | None = None) -> None:
        super().__init__(run_id, f"memory://{name}", secret)
        self.space = memory_space(name)

    def read(self) -> Snapshot | None:
        with self.space.lock:
            run = self.space.runs.get(self.run_id)
            if run is None or run.doc is None:
                return None
            raw, version, unsealed = run.doc, run.version, run.unsealed
        if unsealed is not None and unsealed[0] == version and unsealed[1] == self._secret:
            return unsealed[2]
        snap = self._snapshot(raw, version)
        with self.space.lock:
            if run.version == version:
                run.unsealed = (version, self._secret, snap)
        return snap

    def last_modified(self) -> float | None:
        with self.space.lock:
            run = self.space.runs.get(self.run_id)
            return None if run is None else run.modified

    def _read_raw(self) -> tuple[bytes, str] | None:
        with self.space.lock:
            run = self.space.runs.get(self.run_id)
            if run is None or run.doc is None:
                return None
            return run.doc, run.version

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        with self.space.lock:
            run = self.space.run(self.run_id)
            if expected is None:
                if run.doc is not None:
                    return None
            elif run.doc is None or run.version != expected[1]:
                return None
            run.doc = raw
            run.version = _version(raw)
            run.modified = time.time()
            return run.version

    def _put_record(self, kind: str, name: str, raw: bytes) -> None:
        with self.space.lock:
            run = self.space.run(self.run_id)
            run.records.setdefault(kind, {})[name] = raw
            run.modified = time.time()

    def _read_record(self, kind: str, name: str) -> bytes | None:
        with self.space.lock:
            run = self.space.runs.get(self.run_id)
            return None if run is None else run.records.get(kind, {}).get(name)

    def _list_records(self, kind: str) -> dict[str, str]:
        with self.space.lock:
            run = self.space.runs.get(self.run_id)
            if run is None:
                return {}
            return {k: _version(v) for k, v in run.records.get(kind, {}).items()}

    def _delete_record(self, kind: str, name: str) -> None:
        with self.space.lock:
            run = self.space.runs.get(self.run_id)
            if run is not None:
                run.records.get(kind, {}).pop(name, None)

    def delete_run(self) -> None:
        with self.space.lock:
            self.space.runs.pop(self.run_id, None)

    def sibling(self, run_id: str) -> MemoryStore:
        return MemoryStore(self.location.removeprefix("memory://"), run_id, self._secret)
