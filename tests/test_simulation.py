"""Smoke tests of the scale-simulation support (fsrdzv.testing._sim): the virtual-time scheduler, the store
model, and 64 real handlers forming a round on modelled S3 (a few seconds of real time)."""

from __future__ import annotations

import random
import threading

import pytest

from fsrdzv._handler import RendezvousHandler
from fsrdzv._keepalive import Heartbeat
from fsrdzv._session import Session
from fsrdzv._settings import Settings
from fsrdzv.testing._sim import (
    NFS,
    S3,
    SimRuntime,
    SimStorage,
    SimulationStalled,
    Throttled,
    VirtualClock,
)

pytestmark = pytest.mark.timeout(60)


def test_virtual_sleep_orders_threads_by_wake_up_time() -> None:
    clock = VirtualClock()
    seen: list[tuple[str, float]] = []

    def sleeper(name: str, delays: list[float]) -> None:
        for d in delays:
            clock.sleep(d)
            seen.append((name, clock()))

    clock.spawn(sleeper, "a", [1.0, 1.0, 1.0], name="a")
    clock.spawn(sleeper, "b", [0.5, 2.0], name="b")
    clock.spawn(sleeper, "c", [10.0], name="c", delay=100.0)
    clock.run(until=50.0)
    assert seen == [("b", 0.5), ("a", 1.0), ("a", 2.0), ("b", 2.5), ("a", 3.0)]
    assert clock() == 50.0 and clock.live == 1
    clock.run()
    assert seen[-1] == ("c", 110.0)
    assert clock.live == 0 and not clock.errors


def test_sleep_outside_a_simulated_thread_is_refused() -> None:
    with pytest.raises(RuntimeError, match="spawn"):
        VirtualClock().sleep(1.0)


def test_a_thread_blocked_outside_the_scheduler_is_reported() -> None:
    clock = VirtualClock()
    gate = threading.Event()
    clock.spawn(gate.wait, name="stuck")
    with pytest.raises(SimulationStalled):
        clock.run(stall_timeout=0.5)
    gate.set()
    clock.stop()


def test_document_write_rate_and_prefix_rate_are_enforced() -> None:
    clock = VirtualClock()
    model = S3.with_(object_write_rate=1.0, throttle_retries=0, prefix_write_rate=2.0, prefix_retries=0)
    storage = SimStorage(model, clock, seed=3)
    store = storage.open("test-sim-rates", "run")
    outcome: dict[str, object] = {}

    def body() -> None:
        first = store.compare_and_set(b"1", None)
        second = store.compare_and_set(b"2", first.snapshot.token if first.snapshot else None)
        outcome["cas"] = (first.won, second.won)  # the second comes well within 1 s: over the object's rate
        clock.sleep(1.0)
        third = store.compare_and_set(b"3", first.snapshot.token if first.snapshot else None)
        outcome["later"] = third.won
        try:
            for i in range(5):
                store.put_record("hb", f"n{i}", b"x")
        except Throttled:
            outcome["throttled"] = True

    clock.spawn(body)
    clock.run()
    assert not clock.errors, clock.errors
    assert outcome == {"cas": (True, False), "later": True, "throttled": True}
    assert storage.total.object_throttled == 1 and storage.total.cas_won == 2
    assert storage.total.prefix_throttled >= 1


@pytest.mark.parametrize("model", [S3, NFS], ids=["s3", "nfs"])
def test_64_real_handlers_form_and_stay_off_the_document(model: object) -> None:
    n = 64
    clock = VirtualClock()
    storage = SimStorage(model, clock, seed=7)  # type: ignore[arg-type]
    settings = Settings("smoke", n, n)
    ranks: dict[int, int] = {}
    done: dict[int, float] = {}

    def node(i: int) -> None:
        handler = RendezvousHandler(
            storage.open("test-sim-64", "smoke"),
            settings,
            local_addr=f"10.0.0.{i}",
            clock=clock,
            sleep=clock.sleep,
            rng=random.Random(i),
            runtime=runtime,
        )
        info = handler.next_rendezvous()
        ranks[i] = info.rank
        done[i] = clock()
        clock.sleep(60.0)  # hold the round while the keep-alives run
        handler.shutdown()

    runtime = SimRuntime(clock)
    for i in range(n):
        clock.spawn(node, i, name=f"node-{i}")
    try:
        while len(done) < n and clock() < 120 and not clock.errors:
            clock.run(until=clock() + 1.0)
        assert not clock.errors, clock.errors[:2]
        assert sorted(ranks.values()) == list(range(n))
        formation = max(done.values())
        assert formation < 30.0
        clock.run(until=clock() + 10.0)
        before = storage.total.snapshot()
        clock.run(until=clock() + 30.0)
        steady = storage.total.snapshot().minus(before)
    finally:
        clock.stop()
    assert steady.cas_won == 0 and steady.ops["cas"] == 0  # heartbeats never touch the document
    assert 0.8 * n * 30 / 5 <= steady.ops["put"] <= 1.2 * n * 30 / 5  # one heartbeat per node every 5 s


def test_a_node_that_beats_while_its_keep_alive_beats_does_not_stall_the_simulation() -> None:
    # The two share the handler's beat lock; the keep-alive holds it across its modelled write. A real lock would
    # block the node's thread outside the scheduler (a node that rejoins beats at once), and the whole run with it.
    clock = VirtualClock()
    storage = SimStorage(S3.with_(sigma=0.0), clock, seed=1)
    session = Session(storage.open("test-sim-beats", "beats"), clock=clock, sleep=clock.sleep)
    heartbeat = Heartbeat(session, "node", 1.0, SimRuntime(clock), clock)

    def node() -> None:
        heartbeat.start()  # beats now (done at 0.06 s); the keep-alive beats at 1.06 s (done at 1.12 s)
        clock.sleep(1.01)
        heartbeat.beat()  # at 1.07 s: waits for the keep-alive's write in flight
        heartbeat.stop()

    clock.spawn(node, name="node")
    try:
        clock.run(until=5.0, stall_timeout=5.0)
    finally:
        clock.stop()
    assert not clock.errors, clock.errors
    assert heartbeat.count == 3 and storage.total.ops["put"] == 3


def test_a_record_tag_is_one_bodiless_request_that_changes_with_the_record() -> None:
    clock = VirtualClock()
    storage = SimStorage(S3.with_(sigma=0.0), clock, seed=1)
    store = storage.open("test-sim-tags", "tags")
    seen: list[object] = []

    def body() -> None:
        seen.append(store.record_tag("hb", "a"))
        store.put_record("hb", "a", b"1")
        before = storage.total.body_bytes
        seen.append(store.record_tag("hb", "a"))
        seen.append(storage.total.body_bytes - before)
        store.put_record("hb", "a", b"2")
        seen.append(store.record_tag("hb", "a"))
        seen.append(clock())

    clock.spawn(body)
    clock.run()
    assert not clock.errors, clock.errors
    missing, first, body_bytes, second, end = seen
    assert missing is None and first is not None and second not in (None, first)
    assert body_bytes == 0  # a HEAD answers without a body
    assert storage.total.ops["tag"] == 3 and storage.total.ops["get"] == 0
    assert end == pytest.approx(5 * 0.060)  # three tag reads and two writes, 60 ms each
