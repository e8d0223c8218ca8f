"""The modelled storage service (:class:`SimStorage`) and each node's view of it (:class:`SimStore`)."""

from __future__ import annotations

import errno
import math
import random
import threading
from dataclasses import dataclass, field

from ..._errors import StorageError
from ..._store import Snapshot, Store, decode_name, unseal
from ..._stores._memory import MemoryStore
from ._models import StoreModel
from ._scheduler import VirtualClock

__all__ = ["SimCounters", "SimStorage", "SimStore", "Throttled"]


class Throttled(StorageError):
    """The modelled store refused a request for its rate (S3 503 SlowDown, GCS 429), after the SDK's retries."""


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
