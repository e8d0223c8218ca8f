"""Latency-and-rate models of the storage services the simulation runs against, with presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Final

__all__ = ["GCS", "GCS_THROTTLED", "NFS", "PRESETS", "S3", "S3_THROTTLED", "StoreModel"]


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
    #: Bytes of the body of a write's answer (S3 and NFS: none; GCS: the JSON of the generation field, asked for alone).
    write_answer_bytes: int = 0
    #: Bytes of the body of a record's metadata request (S3 and Azure HEAD, NFS: none; GCS: the generation field).
    tag_answer_bytes: int = 0
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
    write_answer_bytes=32,
    tag_answer_bytes=32,
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
