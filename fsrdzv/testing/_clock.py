"""A manual clock for deterministic tests of timeouts and liveness."""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A monotonic clock that only moves when told to; ``sleep`` advances it instead of blocking.

    Pass ``clock=fake`` and ``sleep=fake.sleep`` wherever fsrdzv takes a clock and a sleep function.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
