"""The handler with real processes contending on real storage: formation, last call, late joiners, spares,
failures, close, timeouts, run-id reuse, and clock skew.

Each scenario runs on a local directory; the ``store_endpoint`` fixture adds S3 (moto) where the object-store
fixtures are available.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

import fsrdzv
from fsrdzv._state import decode_state
from tests.nodes import FAST, Node, check_round


@pytest.fixture(params=["dir", "s3"])
def store_endpoint(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    if request.param == "dir":
        return str(tmp_path / "rdzv"), {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return endpoint.url, endpoint.storage_options


def run_id() -> str:
    return "job-" + uuid.uuid4().hex[:8]


def state_of(endpoint: str, rid: str, options: dict[str, Any]) -> fsrdzv.Store:
    return fsrdzv.open_store(endpoint, rid, storage_options=options)


def read_state(endpoint: str, rid: str, options: dict[str, Any]) -> Any:
    snap = state_of(endpoint, rid, options).read()
    assert snap is not None
    return decode_state(snap.data, "test")


def kill_all(nodes: list[Node]) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            n.kill()


@pytest.mark.parametrize("count", [1, 4])
def test_formation_min_equals_max(store_endpoint: tuple[str, dict[str, Any]], count: int) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    nodes = [Node(endpoint, rid, count, count, addr=f"127.0.0.{i + 1}", options=options) for i in range(count)]
    try:
        ranks = [n.wait_for("rank", 60) for n in nodes]
        check_round(ranks, count)
        assert ranks[0]["round"] == 0
        # Ranks follow the sorted node identity: address first, as torch does.
        assert [r["rank"] for r in ranks] == list(range(count))
        assert ranks[0]["master"][0] == "127.0.0.1"
        for n in nodes:
            assert n.wait(30) == 0
    finally:
        kill_all(nodes)


def test_last_call_waits_then_completes_with_min(store_endpoint: tuple[str, dict[str, Any]]) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    settings = {"last_call_timeout": 1.5}
    a = Node(endpoint, rid, 2, 4, addr="127.0.0.1", options=options, settings=settings)
    b = Node(endpoint, rid, 2, 4, addr="127.0.0.2", options=options, settings=settings)
    try:
        ra, rb = a.wait_for("rank", 60), b.wait_for("rank", 60)
        check_round([ra, rb], 2)
        joined = max(e["t"] for n in (a, b) for e in n.events if e["event"] == "joining")
        # Not before the last call expired (on the observers' clocks), and not much after.
        assert ra["t"] - joined >= 1.0
        assert ra["t"] - joined < 10
    finally:
        kill_all([a, b])


def test_max_completes_immediately_without_last_call(store_endpoint: tuple[str, dict[str, Any]]) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    settings = {"last_call_timeout": 30}
    nodes = [Node(endpoint, rid, 1, 3, addr=f"127.0.0.{i + 1}", options=options, settings=settings) for i in range(3)]
    try:
        ranks = [n.wait_for("rank", 25) for n in nodes]
        # With a 30 s last call, only reaching max_nodes can complete the round this fast ... unless a node
        # arrived late; then the round of 1-2 completes after the last call, which this deadline excludes.
        check_round(ranks, 3)
    finally:
        kill_all(nodes)


def test_late_joiner_waits_then_next_round_includes_it(store_endpoint: tuple[str, dict[str, Any]]) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    first = [Node(endpoint, rid, 2, 3, addr=f"127.0.0.{i + 1}", rounds=2, hold=60, options=options) for i in range(2)]
    late: Node | None = None
    try:
        round0 = [n.wait_for("rank", 60) for n in first]
        check_round(round0, 2)
        late = Node(endpoint, rid, 2, 3, addr="127.0.0.3", options=options)
        # Agents notice the waiting node, re-rendezvous, and round 1 has all three.
        for n in first:
            assert n.wait_for("waiting", 30)["count"] >= 1
        round1 = [n.wait_for("rank", 60) for n in [*first, late]]
        check_round(round1, 3)
        assert round1[0]["round"] == 1
    finally:
        kill_all([*first, *([late] if late else [])])


def test_spare_promoted_after_participant_killed(store_endpoint: tuple[str, dict[str, Any]]) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    a = Node(endpoint, rid, 2, 2, addr="127.0.0.1", rounds=2, hold=60, options=options)
    b = Node(endpoint, rid, 2, 2, addr="127.0.0.2", rounds=2, hold=60, options=options)
    spare: Node | None = None
    try:
        check_round([a.wait_for("rank", 60), b.wait_for("rank", 60)], 2)
        spare = Node(endpoint, rid, 2, 2, addr="127.0.0.3", options=options)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = read_state(endpoint, rid, options)
            if state.redundancy_list:
                break
            time.sleep(0.1)
        assert len(state.redundancy_list) == 1
        killed_at = time.time()
        b.kill()
        # The spare notices b's heartbeat stopped, promotes itself, a sees a waiting node and re-forms with it.
        assert a.wait_for("waiting", 30)["count"] >= 1
        round1 = [a.wait_for("rank", 60), spare.wait_for("rank", 60)]
        check_round(round1, 2)
        assert round1[0]["round"] == 1
        timeout = FAST["keep_alive_interval"] * FAST["keep_alive_max_attempt"]
        assert round1[0]["t"] - killed_at < timeout + 10
    finally:
        kill_all([a, b, *([spare] if spare else [])])


def test_dead_participant_detected_within_keep_alive_timeout(store_endpoint: tuple[str, dict[str, Any]]) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    settings = {"keep_alive_interval": 0.5, "keep_alive_max_attempt": 2}
    a = Node(endpoint, rid, 1, 2, addr="127.0.0.1", rounds=2, hold=0, options=options, settings=settings)
    b = Node(endpoint, rid, 1, 2, addr="127.0.0.2", rounds=1, hold=60, options=options, settings=settings)
    try:
        check_round([a.wait_for("rank", 60), b.wait_for("rank", 60)], 2)
        b.kill()
        killed = time.time()
        # a re-joins at once (hold=0, like an agent whose workers failed) and must wait for b to be declared dead.
        r1 = a.wait_for("rank", 60)
        assert r1["world_size"] == 1 and r1["round"] == 1
        elapsed = r1["t"] - killed
        timeout = settings["keep_alive_interval"] * settings["keep_alive_max_attempt"]
        # Dead after timeout (+ one sweep period + one poll), then a last call of 0.5 s for the new round of 1.
        assert timeout - 0.5 <= elapsed <= timeout + settings["keep_alive_interval"] + FAST["last_call_timeout"] + 3
    finally:
        kill_all([a, b])


def test_close_reaches_everyone_and_spares_exit_gracefully(
    store_endpoint: tuple[str, dict[str, Any]], tmp_path: Any
) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    stop = str(tmp_path / "stop-a")
    a = Node(endpoint, rid, 2, 2, addr="127.0.0.1", hold=60, shutdown=True, options=options, stop_file=stop)
    b = Node(endpoint, rid, 2, 2, addr="127.0.0.2", rounds=2, hold=60, options=options)
    spare: Node | None = None
    late: Node | None = None
    try:
        check_round([a.wait_for("rank", 60), b.wait_for("rank", 60)], 2)
        spare = Node(endpoint, rid, 2, 2, addr="127.0.0.3", options=options)
        deadline = time.monotonic() + 30
        while not read_state(endpoint, rid, options).redundancy_list and time.monotonic() < deadline:
            time.sleep(0.1)
        open(stop, "w").close()  # a's job is done: it shuts down, which closes the run for everyone
        assert a.wait_for("shutdown", 30)["ok"] is True
        assert spare.wait_for("graceful", 30)
        assert spare.wait(30) == 0
        # b is still alive (heartbeating): a new node must not reuse the run, it is really closed.
        late = Node(endpoint, rid, 2, 2, addr="127.0.0.4", options=options)
        try:
            late.wait_for("closed", 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; document={read_state(endpoint, rid, options)}; b={b.events[-3:]}") from None
        assert late.wait(30) == 10
        state = read_state(endpoint, rid, options)
        assert state.closed
        # a left cleanly (closing the run): b's peer watch must not take that for a lost participant.
        assert not any(e["event"] in ("waiting", "closed") for e in b.events), b.events
    finally:
        kill_all([a, b, *([spare] if spare else []), *([late] if late else [])])


def test_join_timeout_rolls_back(store_endpoint: tuple[str, dict[str, Any]]) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    n = Node(endpoint, rid, 2, 2, addr="127.0.0.1", options=options, settings={"join_timeout": 1.5})
    try:
        event = n.wait_for("timeout", 30)
        assert "join_timeout=1.5s" in event["message"]
        assert n.wait(30) == 11
        state = read_state(endpoint, rid, options)
        assert state.members() == set()
    finally:
        kill_all([n])


def test_run_id_reuse_after_the_job_ended(store_endpoint: tuple[str, dict[str, Any]]) -> None:
    endpoint, options = store_endpoint
    rid = run_id()
    first = [Node(endpoint, rid, 2, 2, addr=f"127.0.0.{i + 1}", shutdown=True, options=options) for i in range(2)]
    for n in first:
        assert n.wait(60) == 0
    assert read_state(endpoint, rid, options).closed
    started = time.time()
    second = [Node(endpoint, rid, 2, 2, addr=f"127.0.0.{i + 1}", options=options) for i in range(2)]
    try:
        ranks = [n.wait_for("rank", 60) for n in second]
        check_round(ranks, 2)
        # Nodes that shut down cleanly removed their records, so no liveness timeout is needed to start afresh.
        assert max(r["t"] for r in ranks) - started < 15
        state = read_state(endpoint, rid, options)
        assert not state.closed and state.round == 0
        assert {n.events[0]["node"] for n in second} == set(state.participants)
    finally:
        kill_all(second)


def test_crashed_job_members_are_not_inherited(tmp_path: Any) -> None:
    endpoint = str(tmp_path / "rdzv")
    rid = run_id()
    old = [Node(endpoint, rid, 2, 2, addr=f"127.0.0.{i + 1}", hold=60) for i in range(2)]
    check_round([n.wait_for("rank", 60) for n in old], 2)
    kill_all(old)  # a crashed job: no shutdown, records left behind
    new = [Node(endpoint, rid, 2, 2, addr=f"127.0.0.{i + 5}") for i in range(2)]
    try:
        ranks = [n.wait_for("rank", 60) for n in new]
        check_round(ranks, 2)
        state = read_state(endpoint, rid, {})
        assert set(state.participants) == {n.events[0]["node"] for n in new}
    finally:
        kill_all(new)


def test_clock_skew_between_processes(store_endpoint: tuple[str, dict[str, Any]]) -> None:
    """Processes whose clocks are hours apart form rounds, scale up, and keep a full round alive while a spare
    with yet another clock watches their heartbeats for several liveness timeouts: no false deaths."""
    endpoint, options = store_endpoint
    rid = run_id()
    offsets = [-3600.0, 0.0, 3600.0]
    nodes = [
        Node(endpoint, rid, 2, 4, addr=f"127.0.0.{i + 1}", rounds=2, hold=60, options=options, clock_offset=off)
        for i, off in enumerate(offsets)
    ]
    extra: list[Node] = []
    try:
        check_round([n.wait_for("rank", 60) for n in nodes], 3)
        extra.append(Node(endpoint, rid, 2, 4, addr="127.0.0.4", hold=60, options=options, clock_offset=1800.0))
        round1 = [n.wait_for("rank", 60) for n in [*nodes, extra[0]]]
        check_round(round1, 4)
        assert round1[0]["round"] == 1
        formed = read_state(endpoint, rid, options)
        extra.append(Node(endpoint, rid, 2, 4, addr="127.0.0.9", options=options, clock_offset=-7200.0))
        time.sleep(4 * FAST["keep_alive_interval"] * FAST["keep_alive_max_attempt"] + 1)
        state = read_state(endpoint, rid, options)
        assert len(state.redundancy_list) == 1, "the spare should be watching"
        assert state.participants == formed.participants, "a live node was declared dead"
        assert state.round == 1
    finally:
        kill_all([*nodes, *extra])


def test_clock_skew_does_not_cause_false_deaths() -> None:
    """Nodes whose clocks are +-1 hour apart form the same round and nobody is declared dead."""
    endpoint = f"memory://skew-{uuid.uuid4().hex[:8]}"
    rid = run_id()
    offsets = [-3600.0, 0.0, 3600.0, 1800.0]
    results: dict[int, fsrdzv.RendezvousInfo] = {}
    handlers: list[fsrdzv.RendezvousHandler] = []
    errors: list[BaseException] = []

    def node(i: int) -> None:
        offset = offsets[i]
        h = fsrdzv.create_handler(
            endpoint,
            rid,
            2,
            4,
            local_addr=f"10.0.0.{i + 1}",
            clock=lambda: time.monotonic() + offset,
            **{**FAST, "last_call_timeout": 1.0},
        )
        handlers.append(h)
        try:
            results[i] = h.next_rendezvous()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(len(offsets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    ranks = sorted(r.rank for r in results.values())
    assert ranks == [0, 1, 2, 3]
    # A fifth node with a skewed clock waits as a late joiner for several liveness timeouts: nobody dies.
    late = fsrdzv.create_handler(
        endpoint,
        rid,
        2,
        4,
        local_addr="10.0.0.9",
        clock=lambda: time.monotonic() - 7200,
        **{**FAST, "last_call_timeout": 1.0},  # the run's last call: a node with another one is refused
    )
    store = late.store
    deadline = time.monotonic() + 3 * FAST["keep_alive_interval"] * FAST["keep_alive_max_attempt"]
    outcome: list[BaseException] = []

    def spare() -> None:
        try:
            late.next_rendezvous()
        except fsrdzv.RendezvousError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=spare, daemon=True)
    thread.start()
    while time.monotonic() < deadline:
        snap = store.read()
        assert snap is not None
        state = decode_state(snap.data, "test")
        assert len(state.participants) == 4, "a live node was declared dead"
        time.sleep(0.1)
    for h in [*handlers]:
        h.shutdown()
    thread.join(30)
    assert outcome and isinstance(outcome[0], fsrdzv.RendezvousGracefulExitError)
    late.shutdown()


def test_heartbeats_never_write_the_document(tmp_path: Any) -> None:
    endpoint = str(tmp_path / "rdzv")
    rid = run_id()
    nodes = [Node(endpoint, rid, 3, 3, addr=f"127.0.0.{i + 1}", hold=3.0) for i in range(3)]
    try:
        check_round([n.wait_for("rank", 60) for n in nodes], 3)
        before = state_of(endpoint, rid, {}).read()
        time.sleep(2.0)  # several keep-alive intervals of 0.3 s
        after = state_of(endpoint, rid, {}).read()
        assert before is not None and after is not None
        assert before.generation == after.generation
        hb = state_of(endpoint, rid, {}).list_records("hb")
        assert len(hb) == 3
    finally:
        kill_all(nodes)


def test_writes_per_formation_are_linear(tmp_path: Any) -> None:
    endpoint = str(tmp_path / "rdzv")
    rid = run_id()
    count = 8
    nodes = [Node(endpoint, rid, count, count, addr=f"127.0.0.{i + 1}") for i in range(count)]
    try:
        ranks = [n.wait_for("rank", 60) for n in nodes]
        check_round(ranks, count)
        writes = sum(r["ops"]["cas"] + r["ops"]["put"] + r["ops"]["delete"] for r in ranks)
        assert writes <= 4 * count, ranks
    finally:
        kill_all(nodes)


def test_a_hung_participant_makes_the_others_report_a_waiting_node() -> None:
    """Issue 15 §2: while a round is in use, num_nodes_waiting counts a participant whose heartbeat stopped (a
    frozen host), the watcher removes it, and the frozen node learns it was removed once it thaws."""
    endpoint = f"memory://hung-{uuid.uuid4().hex[:8]}"
    rid = run_id()
    settings = {**FAST, "last_call_timeout": 0.3}
    handlers = [fsrdzv.create_handler(endpoint, rid, 2, 3, local_addr=f"10.0.0.{i}", **settings) for i in (1, 2, 3)]
    infos: dict[int, fsrdzv.RendezvousInfo] = {}
    threads = [
        threading.Thread(target=lambda i=i, h=h: infos.__setitem__(i, h.next_rendezvous()))
        for i, h in enumerate(handlers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(infos) == 3 and {i.world_size for i in infos.values()} == {3}
    survivors, frozen = handlers[:2], handlers[2]
    frozen._stop_keepalive()  # as SIGSTOP would: no more heartbeats, no call into the handler
    liveness = FAST["keep_alive_interval"] * FAST["keep_alive_max_attempt"]
    start = time.monotonic()
    waiting = [0, 0]
    while time.monotonic() - start < liveness + 10 and not all(waiting):
        waiting = [h.num_nodes_waiting() for h in survivors]
        time.sleep(0.05)
    took = time.monotonic() - start
    assert all(waiting), f"the survivors never reported the hung node ({waiting})"
    assert took < liveness + 5, took
    state = decode_state(frozen.store.read().data, "test")  # type: ignore[union-attr]
    assert frozen.node_id not in state.members()
    # Thawed, it learns (at its next read of the document) that its round lost a participant, itself, and
    # re-joins like any agent would.
    deadline = time.monotonic() + 10
    while frozen.num_nodes_waiting() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert frozen.num_nodes_waiting() >= 1
    later: dict[int, fsrdzv.RendezvousInfo] = {}
    rejoin = [
        threading.Thread(target=lambda i=i, h=h: later.__setitem__(i, h.next_rendezvous()))
        for i, h in enumerate(survivors)
    ]
    for t in rejoin:
        t.start()
    for t in rejoin:
        t.join(30)
    assert {i.world_size for i in later.values()} == {2} and later[0].round > infos[0].round
    for h in handlers:
        h.shutdown()


def test_crashed_nodes_stay_gone_past_the_history_limit() -> None:
    """Issue 15 §5: more nodes crash (no shutdown) than the document remembers departed nodes (applied_history,
    lowered here through the settings): the sweep that removes them deletes their records, so none is ever folded
    back into a later round."""
    endpoint = f"memory://history-{uuid.uuid4().hex[:8]}"
    rid = run_id()
    settings = fsrdzv.Settings(rid, 1, 8, **{**FAST, "last_call_timeout": 0.3}, applied_history=2)
    store = fsrdzv.open_store(endpoint, rid)
    crashed: set[str] = set()
    live = fsrdzv.RendezvousHandler(store, settings, local_addr="10.0.0.1")
    for wave in range(3):
        doomed = [
            fsrdzv.RendezvousHandler(fsrdzv.open_store(endpoint, rid), settings, local_addr=f"10.0.{wave + 1}.{i}")
            for i in range(3)
        ]
        infos: list[fsrdzv.RendezvousInfo] = []
        threads = [
            threading.Thread(target=lambda h=h, out=infos: out.append(h.next_rendezvous())) for h in [live, *doomed]
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(infos) == 4
        for h in doomed:
            h._stop_keepalive()  # a crash: no shutdown, records left behind
            crashed.add(h.node_id)
    # The live node's next joins sweep the crashed ones out; none may ever come back.
    for _ in range(3):
        info = live.next_rendezvous()
        state = decode_state(store.read().data, "test")  # type: ignore[union-attr]
        assert not crashed & state.members(), f"crashed nodes folded back: {sorted(crashed & state.members())}"
        assert info.world_size == 1
    assert len([k for k in state.applied if k not in state.members()]) <= 2
    live.shutdown()
