"""The ring watch of peers' heartbeats while a round is in use (``fsrdzv._peers``), with real handlers in threads
on a directory: a peer that stops heartbeating is reported lost by ``num_nodes_waiting``; a peer that leaves
cleanly and closes the run is not."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import fsrdzv
from fsrdzv import RendezvousHandler, RendezvousInfo
from fsrdzv._liveness import LivenessTracker
from fsrdzv._peers import ring_peers
from fsrdzv._state import decode_state
from fsrdzv._steady import STEADY_JITTER, STEADY_POLL

INTERVAL = 0.2
ATTEMPTS = 3
TIMEOUT = INTERVAL * ATTEMPTS


def pair(tmp_path: Path, min_nodes: int = 2) -> tuple[RendezvousHandler, RendezvousHandler]:
    """Two handlers (max 2) that formed round 0 together."""
    handlers = [
        fsrdzv.create_handler(
            str(tmp_path),
            "run",
            min_nodes,
            2,
            local_addr=f"127.0.0.{i + 1}",
            keep_alive_interval=INTERVAL,
            keep_alive_max_attempt=ATTEMPTS,
            last_call_timeout=1.0,
            join_timeout=30,
        )
        for i in range(2)
    ]
    infos: list[RendezvousInfo] = []
    threads = [threading.Thread(target=lambda h=h: infos.append(h.next_rendezvous())) for h in handlers]

    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(infos) == 2 and {i.round for i in infos} == {0}
    return handlers[0], handlers[1]


def waiting_within(handler: RendezvousHandler, seconds: float) -> int:
    """The first non-zero ``num_nodes_waiting()`` within ``seconds`` (0 if none), asked as torchrun's agent does."""
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if count := handler.num_nodes_waiting():
            return count
        time.sleep(0.05)
    return 0


def test_a_peer_that_stops_heartbeating_is_lost_and_removed(tmp_path: Path) -> None:
    a, b = pair(tmp_path)
    try:
        b._stop_keepalive()  # b hangs: no heartbeat any more, nothing else happens
        assert waiting_within(a, TIMEOUT + 5) == 1
        snap = fsrdzv.open_store(str(tmp_path), "run").read()
        assert snap is not None
        assert b.node_id not in decode_state(snap.data, "test").participants
    finally:
        a.shutdown()
        b.shutdown()


def test_a_peer_that_shuts_down_and_closes_the_run_is_not_lost(tmp_path: Path) -> None:
    a, b = pair(tmp_path)
    try:
        assert b.shutdown() is True  # b is done: its records go, the run is closed for everyone
        # a keeps working (as torch's agent would, until its own workers end): no re-rendezvous is asked for.
        assert waiting_within(a, TIMEOUT * 3 + 2) == 0
        # is_closed answers from the steady reads of the document (one per STEADY_POLL at most).
        stop = time.monotonic() + STEADY_POLL * (1 + STEADY_JITTER) + 1
        while not a.is_closed() and time.monotonic() < stop:
            time.sleep(0.1)
        assert a.is_closed()
    finally:
        a.shutdown()


def test_a_thawed_node_learns_its_round_is_over(tmp_path: Path) -> None:
    """b hangs; a removes it and forms round 1 alone (min 1); b, thawed, must be told to re-rendezvous (its idle
    workers fail nothing), then it joins the next round, which a's agent learns of as a waiting node."""
    a, b = pair(tmp_path, min_nodes=1)
    try:
        b._stop_keepalive()
        assert waiting_within(a, TIMEOUT + 5) == 1
        assert a.next_rendezvous().participants == ("127.0.0.1",)
        assert waiting_within(b, 10) == 1  # within one steady read of the document
        assert b.num_nodes_waiting() == 1  # and so until it re-joins
    finally:
        a.shutdown()
        b.shutdown()


def test_ring_peers_are_the_next_ranks() -> None:
    ids = ["a", "b", "c", "d"]
    assert ring_peers(ids, "c", 2) == ["d", "a"]
    assert ring_peers(ids, "a", 0) == ["b", "c", "d"]
    assert ring_peers(ids, "x", 2) == ids
    assert ring_peers(["a"], "a", 2) == []


def test_a_seeded_tracker_times_a_peer_from_its_watched_last_change() -> None:
    """``LivenessTracker.seed``: what the ring watch saw carries into the join's tracker (fresh credit 2.5 s)."""
    tracker = LivenessTracker(15.0, fresh_credit=2.5)
    tracker.seed({"x": 0.0, "old": -100.0}, floor=5.0)
    tracker.observe({"x": "t1", "old": "t9", "y": "t2"}, 3.0, ["x", "old", "y"])
    assert tracker.age("x", 3.0) == 3.0  # from the watch's estimate, not from this first look
    assert tracker.age("old", 3.0) == 5.0  # never older than the floor: a live node keeps time to show a change
    assert tracker.age("y", 3.0) == 2.5  # not watched: the fresh-observer rule
    # "old" is given timeout - floor = 10 s from the first look; x is dead 15 s after its watched last change.
    assert tracker.dead(["x", "old", "y"], 12.9) == set()
    assert tracker.dead(["x", "old", "y"], 13.0) == {"old"}
    assert tracker.dead(["x", "old", "y"], 15.0) == {"x", "old"}
    # Seeds serve one observation only; a change seen later counts as usual.
    tracker.observe({"x": "t3", "old": "t9", "y": "t2"}, 4.0, ["x", "old", "y"])
    assert tracker.age("x", 4.0) == 0.5


def test_a_seed_floor_counts_from_the_first_observation_not_from_the_seeding() -> None:
    """A join that cannot read for a while (a storage outage) must not find every seeded peer dead at once."""
    tracker = LivenessTracker(15.0, fresh_credit=2.5)
    tracker.seed({"x": 0.0}, floor=5.0)
    tracker.observe({"x": "t1"}, 100.0, ["x"])
    assert tracker.dead(["x"], 100.0) == set()
    assert tracker.age("x", 100.0) == 5.0
