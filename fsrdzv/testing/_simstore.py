"""Scale simulation support: a virtual-time thread scheduler and a latency-and-rate model of a store.

Thousands of rendezvous nodes run the real handler code as threads of one process. Every thread's ``sleep`` and
every modelled storage latency blocks it until the *virtual* clock reaches its wake-up time; when every thread is
blocked, the scheduler moves the clock to the earliest wake-up and runs that thread (one at a time, so a run is
deterministic for a given seed). Minutes of simulated time for 4,096 nodes take seconds to minutes of real time,
on any number of cores. CPU time is not modelled: the protocol's own computation takes zero virtual time.

Typical use::

    clock = VirtualClock()
    storage = SimStorage(S3, clock, seed=1)
    store = storage.open("memory-space-name", run_id)    # one SimStore per node
    handler = RendezvousHandler(store, settings, clock=clock, sleep=clock.sleep)
    with simulated_handlers(clock):                       # keep-alive threads on virtual time
        clock.spawn(handler.next_rendezvous)
        clock.run()

The model (:class:`StoreModel`) gives each operation kind a log-normal latency, limits the conditional-write
rate of each object with a token bucket (answered as the real store answers a throttled write: a lost
compare-and-set, a retried 429, or an error), and limits the request rate of the whole run's prefix (S3's
per-prefix 5,500 GET/s and 3,500 PUT/s, GCS's initial per-bucket rates), with the SDK's own retries.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import math
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final

from .._errors import RendezvousError, StorageError
from .._store import Snapshot, Store, decode_name, unseal
from .._stores._memory import MemoryStore

__all__ = [
    "GCS",
    "GCS_THROTTLED",
    "NFS",
    "PRESETS",
    "S3",
    "S3_THROTTLED",
    "SimCounters",
    "SimStorage",
    "SimStore",
    "SimulationStalled",
    "SimulationStopped",
    "StoreModel",
    "Throttled",
    "VirtualClock",
    "simulated_handlers",
]


class SimulationStopped(BaseException):
    """Raised inside simulated threads when the simulation is stopped (not an Exception: nothing catches it)."""


class SimulationStalled(RuntimeError):
    """No simulated thread made progress for too long in real time (one is blocked outside the scheduler)."""


class Throttled(StorageError):
    """The modelled store refused a request for its rate (S3 503 SlowDown, GCS 429), after the SDK's retries."""


# -- the virtual-time scheduler --------------------------------------------------------------------------------


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
            self._stopped = True
            heap, self._heap = self._heap, []
        for _, _, waiter in heap:
            waiter.wake()


def _thread_dump() -> str:
    frames = sys._current_frames()
    out = []
    for thread in threading.enumerate()[:8]:
        frame = frames.get(thread.ident or -1)
        if frame is not None:
            out.append(f"--- {thread.name}\n" + "".join(traceback.format_stack(frame, limit=8)))
    return "\n".join(out)


# -- the storage model -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreModel:
    """Latency and rate limits of one kind of storage (seconds, requests per second).

    Latencies are log-normal with the given median and ``sigma`` (``sigma=0.3`` puts p99 at about 2x the
    median). Half of an operation's latency passes before it takes effect, half after.
    """

    name: str
    read_latency: float
    write_latency: float
    list_latency: float
    #: Extra latency per page of a listing beyond the first, and the page size (S3 and GCS: 1,000 keys).
    list_page_latency: float = 0.0
    list_page_size: int = 1000
    sigma: float = 0.3
    #: Conditional writes per second one object accepts (token bucket), and the bucket's burst.
    object_write_rate: float = math.inf
    object_write_burst: float = 1.0
    #: How a write over the object's rate is answered: "lost" (a failed compare-and-set, like S3's 409 after
    #: the store's retries), "error" (a storage error) — after ``throttle_retries`` SDK retries with back-off
    #: ``throttle_backoff * 2**attempt`` (jittered), as GCS's client retries 429.
    throttle_answer: str = "lost"
    throttle_retries: int = 0
    throttle_backoff: float = 0.05
    throttle_backoff_cap: float = 32.0
    #: Requests per second the whole run's prefix accepts (S3 per-prefix, GCS per-bucket), with a 1-second burst;
    #: over it a request is retried ``prefix_retries`` times by the SDK and then fails with :class:`Throttled`.
    prefix_read_rate: float = math.inf
    prefix_write_rate: float = math.inf
    prefix_retries: int = 3
    prefix_backoff: float = 0.1
    source: str = ""

    def with_(self, **changes: Any) -> StoreModel:
        return replace(self, **changes)


#: Amazon S3 Standard: ~60 ms per request, ~15 conditional writes/s per object (409/412 beyond, retried by the
#: store as S3Store does, then a lost compare-and-set).
S3: Final = StoreModel(
    name="S3",
    read_latency=0.060,
    write_latency=0.060,
    list_latency=0.060,
    list_page_latency=0.040,
    object_write_rate=15.0,
    object_write_burst=1.0,
    throttle_answer="lost",
    throttle_retries=3,
    throttle_backoff=0.05,
    throttle_backoff_cap=1.0,
    source="storage-semantics.md 5.1: S3 CAS 58-68 ms, 14.7-15.3 op/s per object",
)

#: Google Cloud Storage: 50-100 ms reads, ~200 ms writes, 1 write/s per object name (429 beyond, retried by the
#: client library from 1 s, doubling, then an error).
GCS: Final = StoreModel(
    name="GCS",
    read_latency=0.075,
    write_latency=0.200,
    list_latency=0.075,
    list_page_latency=0.050,
    object_write_rate=1.0,
    object_write_burst=1.0,
    throttle_answer="error",
    throttle_retries=6,
    throttle_backoff=1.0,
    throttle_backoff_cap=32.0,
    source="storage-semantics.md 5.1: 1 write/s per object; turbopuffer ~200 ms per write",
)

#: A shared file system over NFS: 1-5 ms per operation (a locked compare-and-set is the slow one), no rate limits.
NFS: Final = StoreModel(
    name="NFS",
    read_latency=0.001,
    write_latency=0.004,
    list_latency=0.002,
    list_page_latency=0.002,
    list_page_size=1000,
    source="typical NFS v4 round trips on a LAN; test-servers.md 9 for the local floor",
)

#: S3 plus the request rates of one prefix: 5,500 GET/HEAD and 3,500 PUT/LIST/DELETE per second (503 SlowDown
#: beyond, retried 3 times by botocore, then an error). S3 raises them by partitioning a busy prefix over time.
S3_THROTTLED: Final = S3.with_(
    name="S3+prefix",
    prefix_read_rate=5500.0,
    prefix_write_rate=3500.0,
    prefix_retries=3,
    prefix_backoff=0.1,
    source=S3.source + "; AWS: 3,500 PUT / 5,500 GET per second per prefix",
)

#: GCS plus a bucket's initial request rates: 5,000 reads/s and 1,000 writes/s (429 beyond, retried).
GCS_THROTTLED: Final = GCS.with_(
    name="GCS+bucket",
    prefix_read_rate=5000.0,
    prefix_write_rate=1000.0,
    prefix_retries=3,
    prefix_backoff=1.0,
    source=GCS.source + "; GCS request-rate guide: ~1,000 writes and 5,000 reads per second per bucket initially",
)

PRESETS: Final[dict[str, StoreModel]] = {
    "s3": S3,
    "gcs": GCS,
    "nfs": NFS,
    "s3-throttled": S3_THROTTLED,
    "gcs-throttled": GCS_THROTTLED,
}


class _Bucket:
    """A token bucket on virtual time."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        if math.isinf(self.rate):
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        self.tokens = min(self.burst, self.tokens + 1.0)


@dataclass
class SimCounters:
    """Operations that reached the modelled storage, by kind, plus what the model refused."""

    ops: dict[str, int] = field(
        default_factory=lambda: {"read": 0, "cas": 0, "put": 0, "get": 0, "list": 0, "list_pages": 0, "delete": 0}
    )
    cas_won: int = 0
    cas_lost: int = 0
    #: Compare-and-sets refused for the object's write rate (counted once per final answer).
    object_throttled: int = 0
    #: Requests refused for the prefix rate (each SDK attempt counts).
    prefix_throttled: int = 0

    @property
    def reads(self) -> int:
        return self.ops["read"] + self.ops["get"] + self.ops["list"]

    @property
    def writes(self) -> int:
        return self.ops["cas"] + self.ops["put"] + self.ops["delete"]

    def snapshot(self) -> SimCounters:
        return SimCounters(dict(self.ops), self.cas_won, self.cas_lost, self.object_throttled, self.prefix_throttled)

    def minus(self, before: SimCounters) -> SimCounters:
        return SimCounters(
            {k: v - before.ops.get(k, 0) for k, v in self.ops.items()},
            self.cas_won - before.cas_won,
            self.cas_lost - before.cas_lost,
            self.object_throttled - before.object_throttled,
            self.prefix_throttled - before.prefix_throttled,
        )


class SimStorage:
    """The modelled storage service shared by every node's :class:`SimStore` (one per simulation)."""

    def __init__(self, model: StoreModel, clock: VirtualClock, *, seed: int = 0) -> None:
        self.model = model
        self.clock = clock
        self.rng = random.Random(seed)
        self.total = SimCounters()
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        self._doc_cache: dict[tuple[str, str], tuple[str, Snapshot]] = {}
        self._listings: dict[tuple[str, str, str], dict[str, str]] = {}
        self._lock = threading.Lock()

    def open(self, space: str, run_id: str, *, secret: bytes | None = None) -> SimStore:
        """A new node's view of ``run_id`` in the in-memory space ``space``."""
        return SimStore(MemoryStore(space, run_id, secret), self)

    # -- model pieces, called by SimStore ------------------------------------------------------------------

    def latency(self, median: float) -> float:
        if median <= 0:
            return 0.0
        return median * math.exp(self.rng.gauss(0.0, self.model.sigma))

    def bucket(self, key: tuple[str, ...], rate: float, burst: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(rate, burst, self.clock())
        return b

    def backoff(self, base: float, attempt: int, cap: float) -> float:
        return self.rng.uniform(0.5, 1.0) * min(cap, base * 2.0**attempt)


class SimStore(Store):
    """One node's store: the in-memory store behind the latency-and-rate model of :class:`SimStorage`.

    Besides the shared totals it counts this node's own operations (``ops``) and the virtual times of its reads
    (``read_times``), so a benchmark can report per-node read rates.
    """

    def __init__(self, inner: MemoryStore, storage: SimStorage) -> None:
        super().__init__(inner.run_id, f"sim-{storage.model.name}+{inner.location}", inner._secret)
        self.inner = inner
        self.storage = storage
        self.ops: dict[str, int] = dict.fromkeys(SimCounters().ops, 0)
        self.read_times: list[float] = []
        #: Virtual times of this node's document reads only (its polling).
        self.doc_read_times: list[float] = []

    # -- the model -----------------------------------------------------------------------------------------

    def _count(self, kind: str, n: int = 1) -> None:
        self.ops[kind] += n
        self.storage.total.ops[kind] += n
        if kind in ("read", "get", "list"):
            self.read_times.append(self.storage.clock())
            if kind == "read":
                self.doc_read_times.append(self.storage.clock())

    def _admit(self, kind: str) -> None:
        """Charge the prefix rate; retry like the SDK, then raise :class:`Throttled`."""
        storage, model = self.storage, self.storage.model
        write = kind in ("cas", "put", "delete")
        rate = model.prefix_write_rate if write else model.prefix_read_rate
        if math.isinf(rate):
            return
        bucket = storage.bucket(("prefix", self.run_id, "w" if write else "r"), rate, max(1.0, rate))
        for attempt in range(model.prefix_retries + 1):
            if bucket.take(storage.clock()):
                return
            storage.total.prefix_throttled += 1
            # The refused attempt still costs a round trip, then the SDK backs off.
            pause = storage.latency(model.read_latency) + storage.backoff(model.prefix_backoff, attempt, 20.0)
            storage.clock.sleep(pause)
        raise Throttled(errno.EAGAIN, f"{model.name} model: request rate of the run's prefix exceeded ({kind})")

    def _before(self, kind: str, median: float) -> float:
        """Count and admit an operation; sleep half its latency (a write lands mid-way) and return the rest.

        Reads take effect when they are issued and answer after their whole latency (one sleep, not two: it
        halves the simulation's thread switches and changes no outcome of a read-only request).
        """
        self._count(kind)
        self._admit(kind)
        total = self.storage.latency(median)
        if kind in ("read", "get", "list"):
            return total
        self.storage.clock.sleep(total / 2)
        return total / 2

    # -- the raw layer -------------------------------------------------------------------------------------

    def read(self) -> Snapshot | None:
        # Same answer as Store.read, memoised on the version so that thousands of nodes polling a large document
        # share one decoded copy (it costs nothing in virtual time, but real CPU).
        rest = self._before("read", self.storage.model.read_latency)
        got = self.inner._read_raw()
        self.storage.clock.sleep(rest)
        if got is None:
            return None
        raw, version = got
        key = (self.inner.location, self.run_id)
        cached = self.storage._doc_cache.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        generation, payload = unseal(raw, self.describe("document"), self._secret)
        snap = Snapshot(payload, f"{generation}:{version}", generation)
        self.storage._doc_cache[key] = (version, snap)
        return snap

    def _read_raw(self) -> tuple[bytes, str] | None:  # pragma: no cover - read() is overridden
        rest = self._before("read", self.storage.model.read_latency)
        got = self.inner._read_raw()
        self.storage.clock.sleep(rest)
        return got

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        storage, model = self.storage, self.storage.model
        rest = self._before("cas", model.write_latency)
        bucket = storage.bucket(("object", self.run_id, "document"), model.object_write_rate, model.object_write_burst)
        attempt = 0
        while True:
            if bucket.take(storage.clock()):
                version = self.inner._commit(raw, generation, expected)
                if version is None:
                    bucket.give_back()  # a failed precondition writes nothing
                    break
                storage.total.cas_won += 1
                storage.clock.sleep(rest)
                return version
            if not self._precondition_holds(expected):
                break  # 412 comes first
            if attempt >= model.throttle_retries:
                storage.total.object_throttled += 1
                storage.clock.sleep(rest)
                if model.throttle_answer == "error":
                    raise Throttled(errno.EAGAIN, f"{model.name} model: object write rate exceeded (document)")
                storage.total.cas_lost += 1
                return None
            storage.clock.sleep(rest + storage.backoff(model.throttle_backoff, attempt, model.throttle_backoff_cap))
            attempt += 1
            rest = self._before("cas", model.write_latency)
        storage.total.cas_lost += 1
        storage.clock.sleep(rest)
        return None

    def _precondition_holds(self, expected: tuple[int, str] | None) -> bool:
        got = self.inner._read_raw()
        if expected is None:
            return got is None
        return got is not None and got[1] == expected[1]

    def _put_record(self, kind: str, name: str, raw: bytes) -> None:
        rest = self._before("put", self.storage.model.write_latency)
        self.inner._put_record(kind, name, raw)
        listing = self.storage._listings.get((self.inner.location, self.run_id, kind))
        if listing is not None:
            listing[decode_name(name)] = _tag(raw)
        self.storage.clock.sleep(rest)

    def _read_record(self, kind: str, name: str) -> bytes | None:
        rest = self._before("get", self.storage.model.read_latency)
        got = self.inner._read_record(kind, name)
        self.storage.clock.sleep(rest)
        return got

    def list_records(self, kind: str) -> dict[str, str]:
        storage, model = self.storage, self.storage.model
        key = (self.inner.location, self.run_id, kind)
        listing = storage._listings.get(key)
        if listing is None:
            listing = storage._listings[key] = {decode_name(k): v for k, v in self.inner._list_records(kind).items()}
        pages = max(1, math.ceil(len(listing) / model.list_page_size))
        self._count("list")
        self._count("list_pages", pages)
        self._admit("list")
        for _ in range(pages - 1):
            self._admit("list")
        answer = dict(listing)
        storage.clock.sleep(storage.latency(model.list_latency) + (pages - 1) * model.list_page_latency)
        return answer

    def _list_records(self, kind: str) -> dict[str, str]:  # pragma: no cover - list_records is overridden
        return self.inner._list_records(kind)

    def _delete_record(self, kind: str, name: str) -> None:
        rest = self._before("delete", self.storage.model.write_latency)
        self.inner._delete_record(kind, name)
        listing = self.storage._listings.get((self.inner.location, self.run_id, kind))
        if listing is not None:
            listing.pop(decode_name(name), None)
        self.storage.clock.sleep(rest)

    def delete_run(self) -> None:
        self.inner.delete_run()
        for key in [k for k in self.storage._listings if k[:2] == (self.inner.location, self.run_id)]:
            del self.storage._listings[key]


def _tag(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()[:16]


# -- keep-alive threads on virtual time ------------------------------------------------------------------------


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
        from .._handler import next_beat_in  # the handler's own schedule

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
    from .. import _handler

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
