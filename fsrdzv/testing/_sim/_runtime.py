"""Handlers on virtual time: the keep-alive thread and the lock it shares with the node's thread."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

from ..._errors import RendezvousError
from ._scheduler import VirtualClock

__all__ = ["simulated_handlers"]


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


class _SimKeepAlive:
    """Stand-in for the handler's keep-alive thread that beats on the virtual clock."""

    def __init__(self, handler: Any, interval: float, clock: VirtualClock) -> None:
        self._handler = handler
        self._interval = interval
        self._clock = clock
        self._stopped = False
        self.thread = self  # the handler asks ``thread.is_alive()``
        # The node's thread and this one both beat (a node that rejoins beats at once): they share a lock.
        if not isinstance(getattr(handler, "_beat_lock", None), _VirtualLock):
            handler._beat_lock = _VirtualLock(clock)

    def is_alive(self) -> bool:
        return not self._stopped

    def start(self) -> None:
        self._clock.spawn(self._run, name=f"keepalive-{self._handler.node_id}", delay=self._interval)

    def _run(self) -> None:
        from ..._handler import next_beat_in  # the handler's own schedule

        rng = random.Random(self._handler.node_id)
        while not self._stopped:
            started, landed = self._clock.now(), False
            with contextlib.suppress(RendezvousError):
                self._handler._beat()
                landed = True
            self._clock.sleep(next_beat_in(self._interval, started, self._clock.now(), landed, rng))

    def stop(self) -> None:
        self._stopped = True


@contextlib.contextmanager
def simulated_handlers(clock: VirtualClock, *, cache_size: int = 64) -> Iterator[None]:
    """Within the block, fsrdzv handlers run on ``clock`` and share decoded documents.

    * The handler's keep-alive waits on a real-time ``threading.Event``; here it is a simulated thread instead,
      and the lock it shares with the node's thread waits in virtual time.
    * Decoding a document is memoised by its bytes (identical documents decode to the same immutable state),
      so that 4,096 nodes polling a 600 KB document do not spend real minutes parsing the same JSON. It changes
      nothing the handler decides, only how much real CPU the simulation takes.
    """
    from ... import _handler

    original_keepalive = _handler._KeepAlive
    original_decode: Callable[[bytes, str], Any] = getattr(_handler, "decode_state")  # noqa: B009 - not exported
    cache: dict[bytes, Any] = {}

    def decode(data: bytes, where: str) -> Any:
        state = cache.get(data)
        if state is None:
            state = original_decode(data, where)
            if len(cache) >= cache_size:
                cache.pop(next(iter(cache)))
            cache[data] = state
        return state

    def keepalive(handler: Any, interval: float) -> _SimKeepAlive:
        return _SimKeepAlive(handler, interval, clock)

    _handler._KeepAlive = keepalive  # type: ignore[assignment,misc]
    setattr(_handler, "decode_state", decode)  # noqa: B010 - not exported
    try:
        yield
    finally:
        _handler._KeepAlive = original_keepalive  # type: ignore[misc]
        setattr(_handler, "decode_state", original_decode)  # noqa: B010
