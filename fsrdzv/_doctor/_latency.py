"""``latency``: median and p90 of read, CAS and record listing on the scratch run."""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable, Sequence

from .._store import Store
from ._check import SLOW_CAS, SLOW_READ, Check

__all__ = ["check_latency"]


def _timed(samples: int, op: Callable[[], object]) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        op()
        out.append(time.perf_counter() - start)
    return out


def _stats(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {"median_ms": round(statistics.median(ordered) * 1000, 2), "p90_ms": round(p90 * 1000, 2)}


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def check_latency(store: Store, samples: int) -> Check:
    snap = store.read()
    token = None if snap is None else snap.token
    store.put_record("hb", "doctor", b'{"n":1}')

    def cas() -> None:
        nonlocal token
        result = store.compare_and_set(b"doctor latency " + secrets.token_hex(4).encode(), token)
        token = None if result.snapshot is None else result.snapshot.token

    reads = _stats(_timed(samples, store.read))
    cases = _stats(_timed(samples, cas))
    lists = _stats(_timed(samples, lambda: store.list_records("hb")))
    details = {"samples": samples, "read": reads, "cas": cases, "list": lists}
    text = ", ".join(
        f"{name} {_ms(stats['median_ms'])} (p90 {_ms(stats['p90_ms'])})"
        for name, stats in (("read", reads), ("CAS", cases), ("list", lists))
    )
    if reads["median_ms"] > SLOW_READ * 1000 or cases["median_ms"] > SLOW_CAS * 1000:
        return Check("latency", "warn", text + ": slow storage makes every join and re-formation slower", details)
    return Check("latency", "pass", text, details)
