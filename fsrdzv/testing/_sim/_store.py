"""The modelled storage service (:class:`SimStorage`) and each node's view of it (:class:`SimStore`)."""

from __future__ import annotations

import errno
import hashlib
import math
import random
import threading
from collections import Counter
from dataclasses import dataclass, field

from ..._errors import StorageError
from ..._store import NOT_MODIFIED, CasResult, NotModified, Snapshot
from ..._stores._memory import MemoryStore
from ..._storewrap import StoreWrapper
from ._models import StoreModel
from ._scheduler import VirtualClock

__all__ = ["SimCounters", "SimStorage", "SimStore", "Throttled"]

#: Bytes of the envelope's header line around a payload, and of a listing's answer: per page and per entry (S3's
#: ListObjectsV2 XML with key, ETag, size and date; measured through benchmarks/steady_proxy.py).
_ENVELOPE = 100
_LIST_BASE = 340
_LIST_ENTRY = 270


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
        default_factory=lambda: {
            "read": 0,
            "unchanged": 0,
            "cas": 0,
            "put": 0,
            "get": 0,
            "tag": 0,
            "list": 0,
            "list_pages": 0,
            "delete": 0,
        }
    )
    cas_won: int = 0
    cas_lost: int = 0
    #: Compare-and-sets refused for the object's write rate (counted once per final answer).
    object_throttled: int = 0
    #: Requests refused for the prefix rate (each SDK attempt counts).
    prefix_throttled: int = 0
    #: Bytes of the response bodies the model's service sent (a conditional read answered 304 sends none).
    body_bytes: int = 0
    #: Requests per object (the document, each record, each listed prefix).
    by_object: Counter[str] = field(default_factory=Counter)

    @property
    def reads(self) -> int:
        return self.ops["read"] + self.ops["get"] + self.ops.get("tag", 0) + self.ops["list"]

    @property
    def writes(self) -> int:
        return self.ops["cas"] + self.ops["put"] + self.ops["delete"]

    def snapshot(self) -> SimCounters:
        return SimCounters(
            dict(self.ops),
            self.cas_won,
            self.cas_lost,
            self.object_throttled,
            self.prefix_throttled,
            self.body_bytes,
            Counter(self.by_object),
        )

    def minus(self, before: SimCounters) -> SimCounters:
        return SimCounters(
            {k: v - before.ops.get(k, 0) for k, v in self.ops.items()},
            self.cas_won - before.cas_won,
            self.cas_lost - before.cas_lost,
            self.object_throttled - before.object_throttled,
            self.prefix_throttled - before.prefix_throttled,
            self.body_bytes - before.body_bytes,
            self.by_object - before.by_object,
        )


class SimStorage:
    """The modelled storage service shared by every node's :class:`SimStore` (one per simulation)."""

    def __init__(self, model: StoreModel, clock: VirtualClock, *, seed: int = 0) -> None:
        self.model = model
        self.clock = clock
        self.rng = random.Random(seed)
        self.total = SimCounters()
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        #: The records of every run and kind as the model lists them, kept in step by every SimStore's writes.
        self.listings: dict[tuple[str, str, str], dict[str, str]] = {}
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


class SimStore(StoreWrapper):
    """One node's store: the in-memory store behind the latency-and-rate model of :class:`SimStorage`.

    Besides the shared totals it counts this node's own operations (``ops``) and the virtual times of its reads
    (``read_times``), so a benchmark can report per-node read rates.
    """

    def __init__(self, inner: MemoryStore, storage: SimStorage) -> None:
        super().__init__(inner, f"sim-{storage.model.name}+{inner.location}")
        self.storage = storage
        self.ops: dict[str, int] = dict.fromkeys(SimCounters().ops, 0)
        self.read_times: list[float] = []
        #: Virtual times of this node's document reads only (its polling).
        self.doc_read_times: list[float] = []

    # -- the model -----------------------------------------------------------------------------------------

    def _sent(self, obj: str, body: int) -> None:
        """One request to ``obj`` whose answer carried ``body`` bytes (S3's list and error answers are XML)."""
        total = self.storage.total
        total.by_object[obj] += 1
        total.body_bytes += body

    def _count(self, kind: str, n: int = 1) -> None:
        self.ops[kind] += n
        self.storage.total.ops[kind] += n
        if kind in ("read", "get", "tag", "list"):
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
        if kind in ("read", "get", "tag", "list"):
            return total
        self.storage.clock.sleep(total / 2)
        return total / 2

    def _listing(self, kind: str) -> dict[str, str] | None:
        return self.storage.listings.get((self.inner.location, self.run_id, kind))

    # -- the store -----------------------------------------------------------------------------------------

    def read(self) -> Snapshot | None:
        rest = self._before("read", self.storage.model.read_latency)
        snap = self.inner.read()
        self._sent("document", 0 if snap is None else len(snap.data) + _ENVELOPE)
        self.storage.clock.sleep(rest)
        return snap

    def read_if_changed(self, token: object) -> Snapshot | NotModified | None:
        # A conditional read costs a request like any read (a 304 counts against the object's rate too).
        rest = self._before("read", self.storage.model.read_latency)
        got = self.inner.read_if_changed(token)
        self._sent("document", len(got.data) + _ENVELOPE if isinstance(got, Snapshot) else 0)
        if got is NOT_MODIFIED:
            self._count("unchanged")
        self.storage.clock.sleep(rest)
        return got

    def compare_and_set(self, data: bytes, token: object = None) -> CasResult:
        storage, model = self.storage, self.storage.model
        rest = self._before("cas", model.write_latency)
        self._sent("document", model.write_answer_bytes)
        bucket = storage.bucket(("object", self.run_id, "document"), model.object_write_rate, model.object_write_burst)
        attempt = 0
        while True:
            if bucket.take(storage.clock()):
                result = self.inner.compare_and_set(data, token)
                if not result.won:
                    bucket.give_back()  # a failed precondition writes nothing
                    break
                storage.total.cas_won += 1
                storage.clock.sleep(rest)
                return result
            if not self._precondition_holds(token):
                break  # 412 comes first
            if attempt >= model.throttle_retries:
                storage.total.object_throttled += 1
                storage.clock.sleep(rest)
                if model.throttle_answer == "error":
                    raise Throttled(errno.EAGAIN, f"{model.name} model: object write rate exceeded (document)")
                storage.total.cas_lost += 1
                return CasResult(False, self.read())
            storage.clock.sleep(rest + storage.backoff(model.throttle_backoff, attempt, model.throttle_backoff_cap))
            attempt += 1
            rest = self._before("cas", model.write_latency)
        storage.total.cas_lost += 1
        storage.clock.sleep(rest)
        # A store answers a lost compare-and-set with a read of the current document, as the real stores do.
        return CasResult(False, self.read())

    def _precondition_holds(self, token: object) -> bool:
        current = self.inner.read()
        return current is None if token is None else current is not None and current.token == token

    def put_record(self, kind: str, name: str, data: bytes) -> None:
        rest = self._before("put", self.storage.model.write_latency)
        self.inner.put_record(kind, name, data)
        self._sent(f"{kind}/{name}", self.storage.model.write_answer_bytes)
        listing = self._listing(kind)
        if listing is not None:
            # Any tag that changes with the content will do: observers only compare tags.
            listing[name] = hashlib.sha256(data).hexdigest()[:16]
        self.storage.clock.sleep(rest)

    def read_record(self, kind: str, name: str) -> bytes | None:
        rest = self._before("get", self.storage.model.read_latency)
        got = self.inner.read_record(kind, name)
        self._sent(f"{kind}/{name}", 0 if got is None else len(got) + _ENVELOPE)
        self.storage.clock.sleep(rest)
        return got

    def record_tag(self, kind: str, name: str) -> str | None:
        # A metadata request (S3 and Azure HEAD, GCS's generation field, a directory's open and fstat).
        rest = self._before("tag", self.storage.model.read_latency)
        got = self.inner.record_tag(kind, name)
        self._sent(f"{kind}/{name}", 0 if got is None else self.storage.model.tag_answer_bytes)
        self.storage.clock.sleep(rest)
        return got

    def list_records(self, kind: str) -> dict[str, str]:
        storage, model = self.storage, self.storage.model
        listing = self._listing(kind)
        if listing is None:
            key = (self.inner.location, self.run_id, kind)
            listing = storage.listings[key] = self.inner.list_records(kind)
        pages = max(1, math.ceil(len(listing) / model.list_page_size))
        self._sent(f"{kind}/ (listing)", _LIST_BASE * pages + _LIST_ENTRY * len(listing))
        self._count("list")
        self._count("list_pages", pages)
        self._admit("list")
        for _ in range(pages - 1):
            self._admit("list")
        answer = dict(listing)
        storage.clock.sleep(storage.latency(model.list_latency) + (pages - 1) * model.list_page_latency)
        return answer

    def delete_record(self, kind: str, name: str) -> None:
        rest = self._before("delete", self.storage.model.write_latency)
        self.inner.delete_record(kind, name)
        self._sent(f"{kind}/{name}", 0)
        listing = self._listing(kind)
        if listing is not None:
            listing.pop(name, None)
        self.storage.clock.sleep(rest)

    def delete_run(self) -> None:
        self.inner.delete_run()
        for key in [k for k in self.storage.listings if k[:2] == (self.inner.location, self.run_id)]:
            del self.storage.listings[key]
