"""Handlers on virtual time: a :class:`~fsrdzv._keepalive.Runtime` whose threads, waits and locks are simulated.

Pass it to every simulated handler (``RendezvousHandler(..., runtime=SimRuntime(clock))``): the keep-alive then
runs as a simulated thread on the virtual clock, the lock it shares with the node's thread waits in virtual time,
and all handlers share one decoded-document cache. Nothing in fsrdzv is patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from ..._keepalive import Background, StopEvent
from ..._session import DocumentCache
from ._scheduler import VirtualClock

__all__ = ["SimRuntime", "simulated_handlers"]


class _VirtualLock:
    """A lock shared by simulated threads: a contended acquire waits in virtual time.

    A real lock held across a modelled latency (the keep-alive's heartbeat write) would block the node's own
    thread outside the scheduler if it wanted the lock meanwhile, and with it the whole simulation. One simulated
    thread runs at a time, so testing and taking the flag needs no other protection.
    """

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._held = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        start = self._clock()
        while self._held:
            if not blocking or 0 <= timeout <= self._clock() - start:
                return False
            self._clock.sleep(0.001)
        self._held = True
        return True

    def release(self) -> None:
        self._held = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _VirtualEvent:
    """A stop flag whose ``wait`` sleeps in virtual time (a stopped loop ends at its next wake-up)."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._set = False

    def wait(self, timeout: float | None = None) -> bool:
        if not self._set:
            self._clock.sleep(0.0 if timeout is None else timeout)
        return self._set

    def set(self) -> None:
        self._set = True


class _SimThread:
    """A simulated thread's handle. Joining it would block outside the scheduler, so it does not wait."""

    def __init__(self) -> None:
        self.done = False

    def is_alive(self) -> bool:
        return not self.done

    def join(self, timeout: float | None = None) -> None:
        return None


class SimRuntime:
    """Simulated threads, events and locks on ``clock``, and one decoded-document cache for all handlers
    (4,096 nodes polling a 600 KB document then parse it once per change, not once per node: real CPU only,
    nothing a handler decides changes)."""

    def __init__(self, clock: VirtualClock, *, cache_size: int = 64) -> None:
        self.clock = clock
        self._documents = DocumentCache(cache_size)

    def start(self, target: Callable[[], None], name: str) -> Background:
        handle = _SimThread()

        def body() -> None:
            try:
                target()
            finally:
                handle.done = True

        self.clock.spawn(body, name=name)
        return handle

    def event(self) -> StopEvent:
        return _VirtualEvent(self.clock)

    def lock(self) -> AbstractContextManager[Any]:
        return _VirtualLock(self.clock)

    def documents(self) -> DocumentCache:
        return self._documents


@contextlib.contextmanager
def simulated_handlers(clock: VirtualClock, *, cache_size: int = 64) -> Iterator[SimRuntime]:
    """A :class:`SimRuntime` for the handlers of one simulation (pass it as their ``runtime``)."""
    yield SimRuntime(clock, cache_size=cache_size)
