"""A store wrapper that injects faults: transient errors, delays and lost replies."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from .._errors import StorageError
from .._store import Store

__all__ = ["FaultyStore", "LostReplyError", "TransientFault"]


class TransientFault(StorageError):
    """An injected transient storage failure (nothing was written)."""


class LostReplyError(StorageError):
    """An injected failure *after* the operation took effect: the reply was lost."""


class FaultyStore(Store):
    """Wrap ``inner`` and make a fraction of operations fail.

    :param fail_rate: probability that an operation raises :class:`TransientFault` before doing anything.
    :param lost_reply_rate: probability that a write is performed and then :class:`LostReplyError` is raised.
    :param delay: seconds added to every operation (through ``sleep``).
    :param ignore_conditions: make compare-and-set ignore its precondition (a store that lies), for testing the
        start-up self-test and ``fsrdzv doctor``.
    """

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
        super().__init__(inner.run_id, inner.location + " (faulty)", None)
        self.inner = inner
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

    # The wrapper forwards the raw layer so that envelopes and tokens stay the inner store's.
    def _read_raw(self) -> tuple[bytes, str] | None:
        self._before("read")
        return self.inner._read_raw()

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        self._before("compare_and_set")
        if self.ignore_conditions:
            # A store that lies: the write lands whatever the precondition says.
            self.inner.corrupt_for_tests(raw)  # type: ignore[attr-defined]
            got = self.inner._read_raw()
            version = None if got is None else got[1]
        else:
            version = self.inner._commit(raw, generation, expected)
        if version is not None:
            self._after_write("compare_and_set")
        return version

    def _put_record(self, kind: str, name: str, raw: bytes) -> None:
        self._before("put_record")
        self.inner._put_record(kind, name, raw)
        self._after_write("put_record")

    def _read_record(self, kind: str, name: str) -> bytes | None:
        self._before("read_record")
        return self.inner._read_record(kind, name)

    def _list_records(self, kind: str) -> dict[str, str]:
        self._before("list_records")
        return self.inner._list_records(kind)

    def _delete_record(self, kind: str, name: str) -> None:
        self._before("delete_record")
        self.inner._delete_record(kind, name)

    def delete_run(self) -> None:
        self.inner.delete_run()

    def sibling(self, run_id: str) -> FaultyStore:
        # The same faults (and the same lies) on another run: the handler's self-test must see them.
        return FaultyStore(
            self.inner.sibling(run_id),
            fail_rate=0.0,
            lost_reply_rate=0.0,
            ignore_conditions=self.ignore_conditions,
            sleep=self._sleep,
        )
