"""The ring watch of peers' heartbeats while a round is in use (``fsrdzv._peers``), with real handlers in threads
on a directory: a peer that stops heartbeating is reported lost by ``num_nodes_waiting``; a peer that leaves
cleanly and closes the run is not."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import fsrdzv
from fsrdzv import RendezvousHandler, RendezvousInfo
from fsrdzv._peers import ring_peers
from fsrdzv._state import decode_state

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
