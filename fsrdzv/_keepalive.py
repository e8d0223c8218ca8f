"""This node's heartbeat record and the keep-alive that rewrites it in the background, on injected time.

Where the background work runs is a :class:`Runtime`: threads and real locks by default (:class:`ThreadRuntime`);
the simulation (``fsrdzv.testing._sim``) passes one whose threads, waits and locks live in virtual time. So the
keep-alive keeps the schedule of :func:`next_beat_in` on whatever clock the handler was given.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ._errors import RendezvousError
from ._periods import BEAT_RETRY
from ._ratelog import log_limited
from ._session import DocumentCache, Session

__all__ = ["Background", "Heartbeat", "Runtime", "StopEvent", "ThreadRuntime", "next_beat_in"]

log = logging.getLogger("fsrdzv")


class Background(Protocol):
    """A running background loop (a thread, or a simulated one)."""

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...


class StopEvent(Protocol):
    """How a background loop waits: ``wait(seconds)`` returns True once :meth:`set` was called."""

    def wait(self, timeout: float | None = None) -> bool: ...

    def set(self) -> None: ...


class Runtime(Protocol):
    """What a handler's background work runs on, and what handlers of one process may share."""

    def start(self, target: Callable[[], None], name: str) -> Background:
        """Run ``target`` in the background (a daemon: it must not keep the process alive)."""
        ...

    def event(self) -> StopEvent: ...

    def lock(self) -> AbstractContextManager[Any]:
        """A lock the background loop and the node's own thread share."""
        ...

    def documents(self) -> DocumentCache:
        """The decoded-document cache of a new handler."""
        ...


class ThreadRuntime:
    """Daemon threads, ``threading`` events and locks, and a private one-document cache per handler."""

    def start(self, target: Callable[[], None], name: str) -> Background:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def event(self) -> StopEvent:
        return threading.Event()

    def lock(self) -> AbstractContextManager[Any]:
        return threading.Lock()

    def documents(self) -> DocumentCache:
        return DocumentCache()


def next_beat_in(interval: float, started: float, now: float, landed: bool, rng: random.Random) -> float:
    """Seconds from ``now`` until the next heartbeat, after one that started at ``started``.

    Beats keep a fixed schedule (one per ``interval`` from the start of the previous one, so that a slow write does
    not stretch the period by its own latency), but never closer than a quarter interval (a store slowed by load
    is not beaten harder). A beat that failed is retried soon (jittered), not a full interval later: others judge
    this node by the time between two beats that landed, and under throttling one failure must not cost a whole
    interval on top of the time the failed write took.
    """
    if landed:
        return max(started + interval - now, interval / 4)
    return min(interval, BEAT_RETRY) * rng.uniform(0.5, 1.5)


class Heartbeat:
    """This node's heartbeat record ``hb/<node id>`` and its keep-alive.

    The keep-alive holds only a weak reference to this object, and the handler stops it when it is collected, so
    a forgotten handler does not beat forever. Failures are logged and retried soon: a heartbeat is idempotent.
    The record is ``{"n": count}`` plus ``fields`` (this node's address candidates, host and boot id, which peers
    read once a round is complete; see ``_address``); readers accept a bare ``{"n": ..}`` from older nodes.
    """

    def __init__(
        self,
        session: Session,
        node_id: str,
        interval: float,
        runtime: Runtime,
        clock: Callable[[], float],
        *,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        self._session = session
        self.node_id = node_id
        self._interval = interval
        self._runtime = runtime
        self._clock = clock
        #: The node's thread and the keep-alive both beat (a node that rejoins beats at once): they share a lock.
        self._lock = runtime.lock()
        #: Heartbeats written so far (the record's content: every beat changes it).
        self.count = 0
        self._running: tuple[StopEvent, Background] | None = None
        #: Everything but the count, encoded once (``{"n":`` is put in front at every beat).
        self._rest = b"," + json.dumps(dict(fields), separators=(",", ":"))[1:].encode() if fields else b"}"

    def beat(self) -> None:
        with self._lock:
            self.count += 1
            self._session.put("hb", self.node_id, b'{"n":%d%s' % (self.count, self._rest))

    def start(self, now: bool = True) -> None:
        """Beat now, and keep beating in the background (once: a running keep-alive goes on). ``now=False``: a
        keep-alive that is not running yet makes the first beat itself, at once, while the caller goes on."""
        running = self._running is not None and self._running[1].is_alive()
        if now or running:
            self.beat()
        if running:
            return
        stop = self._runtime.event()
        first = self._interval if now else 0.0
        loop = _Loop(weakref.ref(self), stop, self._interval, self._clock, random.Random(self.node_id), first=first)
        self._running = (stop, self._runtime.start(loop.run, f"fsrdzv-keepalive-{self.node_id}"))

    def stop(self) -> None:
        """Stop the keep-alive (no more heartbeats: others see this node gone within the liveness timeout)."""
        running, self._running = self._running, None
        if running is not None:
            _halt(running)

    def stopper(self) -> Callable[[], None]:
        """Stops the current keep-alive without a reference to this object (for a finalizer)."""
        running = self._running
        return (lambda: None) if running is None else (lambda: _halt(running))

    @property
    def running(self) -> bool:
        return self._running is not None and self._running[1].is_alive()


def _halt(running: tuple[StopEvent, Background]) -> None:
    stop, background = running
    stop.set()
    if background.is_alive() and threading.current_thread() is not background:
        background.join(timeout=10)


class _Loop:
    def __init__(
        self,
        ref: weakref.ref[Heartbeat],
        stop: StopEvent,
        interval: float,
        clock: Callable[[], float],
        rng: random.Random,
        *,
        first: float,
    ) -> None:
        self._ref, self._stop, self._interval, self._clock, self._rng = ref, stop, interval, clock, rng
        self._first = first
        self._dephase = True

    def run(self) -> None:
        wait = self._first
        while not self._stop.wait(wait):
            heartbeat = self._ref()
            if heartbeat is None:
                return
            started, landed = self._clock(), False
            try:
                heartbeat.beat()
                landed = True
            except RendezvousError as exc:
                what = "keep-alive of %s failed (retrying soon): %s"
                log_limited(log, logging.WARNING, what, heartbeat.node_id, exc, key=heartbeat.node_id)
            except Exception:  # a bug must not kill liveness silently; log it loudly and go on
                log.exception("unexpected error in the keep-alive of %s", heartbeat.node_id)
            del heartbeat
            wait = next_beat_in(self._interval, started, self._clock(), landed, self._rng)
            if landed and self._dephase:
                # Nodes that start together (a job's launch, a re-formation) would beat in phase for ever: N writes
                # in one instant every interval, which a store's per-bucket write rate refuses. One shorter gap,
                # drawn per node, spreads them over the interval; no gap is ever longer than the interval.
                self._dephase = False
                wait = min(wait, self._interval * self._rng.uniform(0.05, 1.0))
