"""A store wrapper that injects faults: transient errors, delays and lost replies."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from .._errors import StorageError
from .._store import CasResult, NotModified, Snapshot, Store
from .._storewrap import StoreWrapper

__all__ = ["FaultyStore", "LostReplyError", "TransientFault"]


class TransientFault(StorageError):
    """An injected transient storage failure (nothing was written)."""


class LostReplyError(StorageError):
    """An injected failure *after* the operation took effect: the reply was lost."""


class FaultyStore(StoreWrapper):
    """Wrap ``inner`` and make a fraction of operations fail.

    Faults are injected around the inner store's public methods, so documents and records keep the inner store's
    envelope and signature: what a FaultyStore writes, the store it wraps reads back.

    :param fail_rate: probability that an operation raises :class:`TransientFault` before doing anything.
    :param lost_reply_rate: probability that a write is performed and then :class:`LostReplyError` is raised.
    :param delay: seconds added to every operation (through ``sleep``).
    :param ignore_conditions: make compare-and-set ignore its precondition (a store that lies), for testing the
        start-up self-test and ``fsrdzv doctor``.
    """

    #: Writes a lying compare-and-set makes before giving up (each lost race is retried on the newest token).
    FORCE_ATTEMPTS = 100

    def __init__(
        self,
        inner: Store,
        *,
        fail_rate: float = 0.0,
        lost_reply_rate: float = 0.0,
        delay: float = 0.0,
        ignore_conditions: bool = False,
        seed: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(inner, inner.location + " (faulty)")
        # Wrapped stores are probed like third-party ones: the handler's self-test must see the lies.
        self.enforces_conditions = False
        self.fail_rate = fail_rate
        self.lost_reply_rate = lost_reply_rate
        self.delay = delay
        self.ignore_conditions = ignore_conditions
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._sleep = sleep
        self.injected = 0
        self.lost = 0

    def _roll(self, rate: float) -> bool:
        with self._rng_lock:
            return rate > 0 and self._rng.random() < rate

    def _before(self, what: str) -> None:
        if self.delay:
            self._sleep(self.delay)
        if self._roll(self.fail_rate):
            self.injected += 1
            raise TransientFault(0, f"injected transient fault in {what} on {self.inner.location}")

    def _after_write(self, what: str) -> None:
        if self._roll(self.lost_reply_rate):
            self.lost += 1
            raise LostReplyError(0, f"injected lost reply after {what} on {self.inner.location}")

    def read(self) -> Snapshot | None:
        self._before("read")
        return self.inner.read()

    def read_if_changed(self, token: object) -> Snapshot | NotModified | None:
        self._before("read")
        return self.inner.read_if_changed(token)

    def compare_and_set(self, data: bytes, token: object = None) -> CasResult:
        self._before("compare_and_set")
        result = self._forced(data, token) if self.ignore_conditions else self.inner.compare_and_set(data, token)
        if result.won:
            self._after_write("compare_and_set")
        return result

    def _forced(self, data: bytes, token: object) -> CasResult:
        """A store that lies: the write lands whatever the precondition says, and reports that it won."""
        result = self.inner.compare_and_set(data, token)
        for _ in range(self.FORCE_ATTEMPTS):
            if result.won:
                return result
            current = result.snapshot
            result = self.inner.compare_and_set(data, None if current is None else current.token)
        return result

    def put_record(self, kind: str, name: str, data: bytes) -> None:
        self._before("put_record")
        self.inner.put_record(kind, name, data)
        self._after_write("put_record")

    def read_record(self, kind: str, name: str) -> bytes | None:
        self._before("read_record")
        return self.inner.read_record(kind, name)

    def list_records(self, kind: str) -> dict[str, str]:
        self._before("list_records")
        return self.inner.list_records(kind)

    def delete_record(self, kind: str, name: str) -> None:
        self._before("delete_record")
        self.inner.delete_record(kind, name)

    def verify_conditions(self) -> None:
        Store.verify_conditions(self)

    def sibling(self, run_id: str) -> FaultyStore:
        # The same faults (and the same lies) on another run: the handler's self-test must see them.
        return FaultyStore(
            self.inner.sibling(run_id),
            fail_rate=0.0,
            lost_reply_rate=0.0,
            ignore_conditions=self.ignore_conditions,
            sleep=self._sleep,
        )
