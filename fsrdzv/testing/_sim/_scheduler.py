"""The virtual-time thread scheduler of the scale simulation: one simulated thread runs at a time."""

from __future__ import annotations

import heapq
import itertools
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable

__all__ = ["SimulationStalled", "SimulationStopped", "VirtualClock"]


class SimulationStopped(BaseException):
    """Raised inside simulated threads when the simulation is stopped (not an Exception: nothing catches it)."""


class SimulationStalled(RuntimeError):
    """No simulated thread made progress for too long in real time (one is blocked outside the scheduler)."""


class _Waiter:
    """A parked simulated thread: a lock used as a binary semaphore (cheaper than an Event)."""

    __slots__ = ("gate", "name")

    def __init__(self, name: str) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.name = name

    def park(self) -> None:
        self.gate.acquire()

    def wake(self) -> None:
        self.gate.release()


class VirtualClock:
    """A virtual monotonic clock and a scheduler of the threads that sleep on it.

    Call it for the time; pass :meth:`sleep` as a handler's ``sleep``. Threads that sleep on it must be started
    with :meth:`spawn`. Exactly one simulated thread runs at any moment.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._now = start
        self._heap: list[tuple[float, int, _Waiter]] = []
        self._seq = itertools.count()
        self._local = threading.local()
        self._live = 0
        self._holder = False  # a simulated thread is running
        self._until: float | None = None
        self._stopped = False
        self._errors: list[tuple[str, BaseException]] = []
        #: Parked threads still to wake after stop(), one at a time.
        self._draining: list[_Waiter] = []
        #: Context switches so far (a measure of the simulation's real cost).
        self.switches = 0

    def __call__(self) -> float:
        return self._now

    def now(self) -> float:
        return self._now

    @property
    def errors(self) -> list[tuple[str, BaseException]]:
        """Uncaught exceptions of simulated threads, as ``(thread name, exception)``."""
        return list(self._errors)

    def spawn(self, fn: Callable[..., object], *args: object, name: str = "sim", delay: float = 0.0) -> None:
        """Start ``fn(*args)`` as a simulated thread, first run ``delay`` virtual seconds from now."""
        waiter = _Waiter(name)

        def body() -> None:
            self._local.waiter = waiter
            waiter.park()
            try:
                if not self._stopped:
                    fn(*args)
            except SimulationStopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - recorded for the driver; a node's crash is a result
                with self._lock:
                    self._errors.append((name, exc))
            finally:
                with self._lock:
                    self._live -= 1
                    self._holder = False
                    self._dispatch_locked()
                    if self._stopped and self._draining:
                        # Stopped threads leave one after another: woken all at once, thousands of threads would
                        # fight over the GIL (each one's timed wait for it wakes it every switch interval).
                        self._draining.pop().wake()

        with self._lock:
            if self._stopped:
                raise SimulationStopped
            self._live += 1
            heapq.heappush(self._heap, (self._now + max(0.0, delay), next(self._seq), waiter))
        threading.Thread(target=body, name=name, daemon=True).start()

    def sleep(self, seconds: float) -> None:
        """Block the calling simulated thread for ``seconds`` of virtual time."""
        waiter: _Waiter | None = getattr(self._local, "waiter", None)
        if waiter is None:
            raise RuntimeError("VirtualClock.sleep called from a thread that was not started with spawn()")
        with self._lock:
            if self._stopped:
                raise SimulationStopped
            seconds = 0.0 if not math.isfinite(seconds) or seconds < 0 else seconds
            heapq.heappush(self._heap, (self._now + seconds, next(self._seq), waiter))
            self._holder = False
            self._dispatch_locked()
        waiter.park()
        if self._stopped:
            raise SimulationStopped

    def _dispatch_locked(self) -> None:
        if self._holder or self._stopped:
            return
        if not self._heap or (self._until is not None and self._heap[0][0] > self._until):
            self._wake.notify_all()
            return
        wake, _, waiter = heapq.heappop(self._heap)
        self._now = max(self._now, wake)
        self._holder = True
        self.switches += 1
        waiter.wake()

    def run(self, until: float | None = None, *, stall_timeout: float = 60.0) -> None:
        """Run simulated threads until all have finished or the clock would pass ``until``.

        :raises SimulationStalled: no thread switch for ``stall_timeout`` real seconds while threads are alive.
        """
        with self._lock:
            self._until = until
            self._dispatch_locked()
            last = (self.switches, time.monotonic())
            while True:
                idle = not self._holder and (
                    not self._heap or (self._until is not None and self._heap[0][0] > self._until)
                )
                if idle and (self._live == 0 or self._heap or self._stopped):
                    break
                if idle and self._live > 0 and not self._heap:
                    raise SimulationStalled(
                        f"{self._live} simulated thread(s) blocked outside the scheduler\n{_thread_dump()}"
                    )
                self._wake.wait(timeout=1.0)
                if self.switches != last[0]:
                    last = (self.switches, time.monotonic())
                elif time.monotonic() - last[1] > stall_timeout:
                    raise SimulationStalled(f"no progress for {stall_timeout:g}s of real time\n{_thread_dump()}")
            if until is not None and self._now < until:
                self._now = until

    @property
    def live(self) -> int:
        """Simulated threads that have not finished."""
        return self._live

    def stop(self) -> None:
        """End the simulation: every blocked thread wakes with :class:`SimulationStopped` and exits."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            heap, self._heap = self._heap, []
            self._draining = [waiter for _, _, waiter in heap]
            if self._draining and not self._holder:
                self._draining.pop().wake()


def _thread_dump() -> str:
    frames = sys._current_frames()  # noqa: SLF001 - the standard library's way to dump every thread
    out = []
    for thread in threading.enumerate()[:8]:
        frame = frames.get(thread.ident or -1)
        if frame is not None:
            out.append(f"--- {thread.name}\n" + "".join(traceback.format_stack(frame, limit=8)))
    return "\n".join(out)
