"""Handler behaviour in one process (threads on memory:// or a directory): torch's handler test cases, ported
as our own, plus the places where fsrdzv deliberately differs (master published every round, JSON state)."""

from __future__ import annotations

import gc
import json
import re
import threading
import time
import uuid
from typing import Any

import pytest

import fsrdzv
from fsrdzv import RendezvousHandler, Settings
from fsrdzv._state import decode_state
from fsrdzv.testing import FakeClock, FaultyStore
from tests.nodes import FAST


def endpoint() -> str:
    return f"memory://unit-{uuid.uuid4().hex[:8]}"


def handler(ep: str, min_nodes: int = 1, max_nodes: int = 1, addr: str = "127.0.0.1", **kw: Any) -> RendezvousHandler:
    return fsrdzv.create_handler(ep, "run", min_nodes, max_nodes, local_addr=addr, **{**FAST, **kw})


def test_next_rendezvous_moves_to_next_round_if_called_repeatedly() -> None:
    h = handler(endpoint())
    rounds = [h.next_rendezvous().round for _ in range(4)]
    assert rounds == [0, 1, 2, 3]
    h.shutdown()


def test_info_fields() -> None:
    h = handler(endpoint(), addr="10.1.2.3")
    info = h.next_rendezvous()
    assert (info.rank, info.world_size, info.master_addr, info.participants) == (0, 1, "10.1.2.3", ("10.1.2.3",))
    assert 0 < info.master_port < 65536
    assert info.run_id == "run" == h.run_id == h.get_run_id()
    h.shutdown()


def test_keep_alive_thread_started_with_next_rendezvous_and_stopped_with_shutdown() -> None:
    h = handler(endpoint())
    name = f"fsrdzv-keepalive-{h.node_id}"
    assert name not in {t.name for t in threading.enumerate()}
    h.next_rendezvous()
    assert name in {t.name for t in threading.enumerate()}
    assert h.shutdown() is True
    assert name not in {t.name for t in threading.enumerate()}


def test_keep_alive_thread_stopped_when_handler_is_collected() -> None:
    h = handler(endpoint())
    h.next_rendezvous()
    name = f"fsrdzv-keepalive-{h.node_id}"
    del h
    gc.collect()
    deadline = time.monotonic() + 5
    while name in {t.name for t in threading.enumerate()} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in {t.name for t in threading.enumerate()}


def test_keep_alive_writes_only_the_own_record() -> None:
    ep = endpoint()
    h = handler(ep)
    h.next_rendezvous()
    store = fsrdzv.open_store(ep, "run")
    before_doc = store.read()
    before_hb = store.list_records("hb")[h.node_id]
    time.sleep(FAST["keep_alive_interval"] * 3)
    assert store.read() == before_doc
    assert store.list_records("hb")[h.node_id] != before_hb
    h.shutdown()


def test_shutdown_closes_and_is_idempotent_and_removes_records() -> None:
    ep = endpoint()
    h = handler(ep)
    h.next_rendezvous()
    assert h.shutdown() is True
    assert h.shutdown() is True
    assert h.is_closed()
    store = fsrdzv.open_store(ep, "run")
    assert store.list_records("hb") == {} and store.list_records("req") == {}


def test_shutdown_returns_false_if_the_run_cannot_be_closed() -> None:
    inner = fsrdzv.open_store(endpoint(), "run")
    h = RendezvousHandler(FaultyStore(inner, fail_rate=1.0), Settings("run", 1, 1, close_timeout=0.2))
    assert h.shutdown() is False


def test_set_closed_is_idempotent_and_next_rendezvous_raises_closed() -> None:
    ep = endpoint()
    h = handler(ep)
    h.next_rendezvous()
    h.set_closed()
    h.set_closed()
    assert h.is_closed()
    with pytest.raises(fsrdzv.RendezvousClosedError):
        h.next_rendezvous()


def test_context_manager_shuts_down() -> None:
    ep = endpoint()
    with handler(ep) as h:
        h.next_rendezvous()
    assert fsrdzv.open_store(ep, "run").list_records("hb") == {}
    assert h.is_closed()


def test_join_timeout_with_an_injected_clock() -> None:
    clock = FakeClock()
    h = handler(endpoint(), 2, 2, join_timeout=30, clock=clock, sleep=clock.sleep)
    started = clock()
    with pytest.raises(fsrdzv.RendezvousTimeoutError, match="join_timeout=30s"):
        h.next_rendezvous()
    assert 30 <= clock() - started < 40


def test_last_call_uses_the_local_clock_only() -> None:
    clock = FakeClock()
    ep = endpoint()
    h = handler(ep, 1, 4, last_call_timeout=20, clock=clock, sleep=clock.sleep)
    start = clock()
    info = h.next_rendezvous()
    assert info.world_size == 1
    assert 20 <= clock() - start < 25
    h.shutdown()


def test_num_nodes_waiting_counts_the_wait_list_not_spares() -> None:
    ep = endpoint()
    a = handler(ep, 1, 2, addr="10.0.0.1")
    b = handler(ep, 1, 2, addr="10.0.0.2")  # the same last call: a node with another one is refused
    a.next_rendezvous()  # round 0 completes with a alone after the last call
    assert a.num_nodes_waiting() == 0
    done: list[fsrdzv.RendezvousInfo] = []
    t = threading.Thread(target=lambda: done.append(b.next_rendezvous()), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while a.num_nodes_waiting() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.num_nodes_waiting() == 1
    info = a.next_rendezvous()
    t.join(10)
    assert info.world_size == 2 and done[0].world_size == 2 and info.round == 1
    # The answer cached before the round formed (b waiting) must not survive it: the agent would restart at once.
    assert a.num_nodes_waiting() == 0
    a.shutdown()
    b.shutdown()


@pytest.mark.parametrize("late_sorts_first", [False, True], ids=["late-sorts-after", "late-sorts-before"])
def test_scale_up_publishes_the_master_of_every_round(late_sorts_first: bool) -> None:
    """torch 2.13 keeps round 0's bootstrap address (stale MASTER_ADDR or two masters); fsrdzv does not."""
    ep = endpoint()
    first_addr, late_addr = ("127.0.0.2", "127.0.0.1") if late_sorts_first else ("127.0.0.1", "127.0.0.2")
    a = handler(ep, 1, 2, addr=first_addr, last_call_timeout=0.2)
    b = handler(ep, 1, 2, addr=late_addr, last_call_timeout=0.2)
    r0 = a.next_rendezvous()
    assert (r0.world_size, r0.master_addr) == (1, first_addr)
    got: list[fsrdzv.RendezvousInfo] = []
    t = threading.Thread(target=lambda: got.append(b.next_rendezvous()), daemon=True)
    t.start()
    while a.num_nodes_waiting() == 0:
        time.sleep(0.05)
    r1 = a.next_rendezvous()
    t.join(10)
    assert r1.round == got[0].round == 1
    assert (r1.master_addr, r1.master_port) == (got[0].master_addr, got[0].master_port)
    assert r1.master_addr == min(first_addr, late_addr)
    a.shutdown()
    b.shutdown()


def test_newer_schema_is_refused_and_not_overwritten(tmp_path: Any) -> None:
    ep = str(tmp_path / "rdzv")
    h = handler(ep)
    h.next_rendezvous()
    store = fsrdzv.open_store(ep, "run")
    snap = store.read()
    assert snap is not None
    doc = json.loads(snap.data)
    doc["schema"] = 99
    newer = store.compare_and_set(json.dumps(doc).encode(), snap.token)
    assert newer.won
    other = handler(ep, addr="127.0.0.9")
    with pytest.raises(fsrdzv.SchemaVersionError, match="schema 99"):
        other.next_rendezvous()
    assert store.read() == newer.snapshot


def test_state_is_json_with_no_wall_clock() -> None:
    ep = endpoint()
    h = handler(ep)
    h.next_rendezvous()
    snap = fsrdzv.open_store(ep, "run").read()
    assert snap is not None
    doc = json.loads(snap.data)
    assert doc["schema"] == 2 and doc["kind"] == "fsrdzv.rendezvous"  # every member reads schema 2
    state = decode_state(snap.data, "test")
    assert state.complete and list(state.participants.values()) == [0]
    assert not re.search(rb"\d{4}-\d{2}-\d{2}", snap.data), "no wall-clock timestamps in the document"
    h.shutdown()


def test_invalid_settings_are_refused() -> None:
    for bad in (
        {"join_timeout": -1},
        {"last_call_timeout": 0},
        {"keep_alive_interval": "soon"},
        {"keep_alive_max_attempt": 0},
    ):
        with pytest.raises(fsrdzv.ConfigurationError):
            fsrdzv.create_handler(endpoint(), "run", 1, 1, **bad)
    with pytest.raises(fsrdzv.ConfigurationError, match="max_nodes"):
        fsrdzv.create_handler(endpoint(), "run", 3, 2)
    with pytest.raises(fsrdzv.ConfigurationError, match="run id"):
        fsrdzv.create_handler(endpoint(), "../etc", 1, 1)
