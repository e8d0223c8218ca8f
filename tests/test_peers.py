"""The ring watch's verdicts (``PeerWatch.lost``): what makes an agent re-rendezvous while a round is in use."""

from __future__ import annotations

import uuid

import pytest

import fsrdzv
from fsrdzv._admin import RunAdmin
from fsrdzv._model import RendezvousState
from fsrdzv._peers import PeerWatch, ring_peers
from fsrdzv.testing import FakeClock

ME, OTHER, THIRD = "a_1_0_aaaaaa", "b_1_0_bbbbbb", "c_1_0_cccccc"


def _round(round_: int, participants: tuple[str, ...], *, closed: bool = False, epoch: str = "e1") -> RendezvousState:
    ranks = {node: rank for rank, node in enumerate(participants)}
    return RendezvousState(run_id="peers", epoch=epoch, round=round_, complete=True, closed=closed, participants=ranks)


@pytest.fixture
def watch() -> PeerWatch:
    run_id = "peers"
    store = fsrdzv.open_store(f"memory://peers-{uuid.uuid4().hex[:8]}", run_id)
    settings = fsrdzv.Settings(run_id=run_id, min_nodes=1, max_nodes=3)
    clock = FakeClock()
    watch = PeerWatch(RunAdmin(store, settings, clock=clock, sleep=clock.sleep), settings, ME, clock)
    watch.start(_round(3, (ME, OTHER, THIRD)))
    return watch


@pytest.mark.parametrize(
    ("state", "lost"),
    [
        (_round(3, (ME, OTHER, THIRD)), 0),
        (_round(3, (ME, OTHER)), 1),
        (_round(3, (ME,)), 2),
        (_round(4, (OTHER, THIRD)), 1),
        (_round(3, (ME, OTHER, THIRD), epoch="e2"), 1),
        (_round(3, (ME, OTHER, THIRD), closed=True), 0),
        (_round(4, (OTHER, THIRD), closed=True), 1),
        (None, 0),
    ],
    ids=[
        "round-in-use",
        "one-participant-removed",
        "two-removed",
        "round-over-without-me",
        "run-restarted",
        "closed-with-me",
        "closed-after-removing-me",
        "no-document",
    ],
)
def test_lost(watch: PeerWatch, state: RendezvousState | None, lost: int) -> None:
    assert watch.lost(state) == lost


def test_nothing_is_lost_when_no_round_is_watched(watch: PeerWatch) -> None:
    watch.stop()
    assert watch.lost(_round(4, (OTHER,))) == 0


def test_ring_peers_are_the_next_ranks() -> None:
    ids = ["n0", "n1", "n2", "n3"]
    assert ring_peers(ids, "n3", 2) == ["n0", "n1"]
    assert ring_peers(ids, "n1", 0) == ["n2", "n3", "n0"]
    assert ring_peers(ids, "x", 2) == ids
