"""``reach`` and ``cas``: a scratch run read back, and compare-and-set raced by writers on separate handles."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence

from .._store import Store
from ._check import Check

__all__ = ["check_cas", "check_reach"]


def _race(stores: Sequence[Store], payloads: Sequence[bytes], token: str | None) -> list[bool]:
    """Every store tries ``compare_and_set(payload, token)`` at the same moment; return who won."""
    barrier = threading.Barrier(len(stores))
    won = [False] * len(stores)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            won[i] = stores[i].compare_and_set(payloads[i], token).won
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,), name=f"fsrdzv-doctor-writer-{i}") for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return won


def check_cas(open_one: Callable[[str], Store], run_id: str, writers: int, rounds: int) -> Check:
    stores = [open_one(run_id) for _ in range(writers)]
    reader = open_one(run_id)
    try:
        reader.delete_run()
        outcomes: list[int] = []
        problems: list[str] = []
        token: str | None = None
        old_tokens: list[str] = []
        for race in range(rounds + 1):
            payloads = [f"doctor race {race} writer {i} {secrets.token_hex(4)}".encode() for i in range(writers)]
            won = _race(stores, payloads, token)
            winners = [i for i, w in enumerate(won) if w]
            outcomes.append(len(winners))
            snap = reader.read()
            what = "create-if-absent" if race == 0 else f"update {race}"
            if len(winners) != 1:
                problems.append(f"{what}: {len(winners)} of {writers} conditional writes won")
            elif snap is None or snap.data != payloads[winners[0]]:
                problems.append(f"{what}: the stored document is not the winner's write")
            if snap is None:
                break
            if token is not None:
                old_tokens.append(token)
            token = snap.token
        stale_won = False
        if old_tokens:
            stale_won = reader.compare_and_set(b"doctor stale write", old_tokens[-1]).won
            if stale_won:
                problems.append("a write with a stale token was accepted")
        details = {
            "writers": writers,
            "races": len(outcomes),
            "winners": outcomes,
            "stale_token_refused": not stale_won,
        }
        if problems:
            return Check(
                "cas",
                "fail",
                "compare-and-set is not atomic: "
                + "; ".join(problems[:3])
                + ". Nodes would lose updates; use a store with conditional writes (see the docs' support matrix)",
                details,
            )
        return Check(
            "cas",
            "pass",
            f"{len(outcomes)} races of {writers} writers: exactly one winner each time; stale token refused",
            details,
        )
    finally:
        for store in [*stores, reader]:
            store.close()


def check_reach(store: Store) -> Check:
    start = time.perf_counter()
    payload = b"doctor reach " + secrets.token_hex(4).encode()
    result = store.compare_and_set(payload, None)
    snap = store.read()
    store.put_record("hb", "doctor", b'{"n":0}')
    record = store.read_record("hb", "doctor")
    listed = "doctor" in store.list_records("hb")
    store.delete_record("hb", "doctor")
    gone = "doctor" not in store.list_records("hb")
    elapsed = time.perf_counter() - start
    problems = []
    if not result.won or snap is None or snap.data != payload:
        problems.append("a document created in a new run did not read back")
    if record != b'{"n":0}' or not listed or not gone:
        problems.append("a record did not read back, list or delete as written")
    details = {"seconds": round(elapsed, 3), "location": store.location}
    if problems:
        return Check("reach", "fail", "; ".join(problems), details)
    return Check("reach", "pass", f"created, read and deleted a scratch run in {elapsed * 1000:.0f} ms", details)
