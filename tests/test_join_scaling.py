"""The join path built to scale: requests carried in record names, one folder, ordered nonces, a read budget.

What these tests pin down:

* a join request travels in its record's name (one listing shows every request), signed with the job secret,
  with a body record as the fallback for requests too long for a file name;
* a node's older request is never folded after a newer one, even when a stale listing still shows it;
* no node reads the store more than ``READ_RATE + READ_BURST`` times in any second, whatever its role;
* when many nodes arrive at once, joiners do not list or read each other's requests: the folder does, and
  total writes stay O(N).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fsrdzv
from fsrdzv._policy import folder_of
from fsrdzv._protocol import fold_requests, new_state, pending, remove_nodes
from fsrdzv._session import READ_BURST, READ_RATE, ReadBudget
from fsrdzv._state import (
    BODY_PREFIX,
    INLINE_PREFIX,
    MAX_INLINE_NAME,
    JoinRequest,
    NodeInfo,
    decode_request_name,
    decode_state,
    encode_request,
    encode_request_name,
    encode_state,
    nonce_order,
    request_owner,
    request_record_name,
)
from fsrdzv._stores._memory import MemoryStore
from fsrdzv.testing import FakeClock
from tests.nodes import FAST

SECRET = b"0123456789abcdef-secret"


def _unsigned(_: str) -> None:
    return None


def _store(secret: bytes | None = None) -> fsrdzv.Store:
    return fsrdzv.open_store(f"memory://scale-{uuid.uuid4().hex[:8]}", "run", secret=secret)


# -- request names -------------------------------------------------------------------------------------------

_text = st.text(min_size=0, max_size=30)
_requests = st.builds(
    JoinRequest,
    node=st.builds(
        NodeInfo,
        addr=st.text(min_size=1, max_size=40),
        pid=st.integers(0, 2**31),
        local_id=st.integers(0, 1000),
        nonce=st.text(alphabet="0123456789abcdef", min_size=6, max_size=6),
        port=st.integers(0, 65535),
        host=_text,
    ),
    nonce=st.text(min_size=1, max_size=20),
    leave_round=st.none() | st.integers(0, 10**6),
)


@settings(max_examples=200, deadline=None)
@given(_requests, st.booleans())
def test_request_name_round_trips(request: JoinRequest, signed: bool) -> None:
    store = _store(SECRET if signed else None)
    name = encode_request_name(request, store.name_mac)
    if name is None:  # too long to inline: the record is named by the node id and holds the request
        assert request_record_name(request, store.name_mac) == BODY_PREFIX + request.node.node_id
        return
    assert name.startswith(INLINE_PREFIX) and len(name) <= MAX_INLINE_NAME
    decoded = decode_request_name(name, store.name_mac)
    assert decoded == request and decoded.node.port == request.node.port and decoded.node.host == request.node.host
    assert request_owner(name) == request.node.node_id
    # The name survives the store's own escaping (what a listing returns).
    store.put_record("req", name, b"{}")
    assert list(store.list_records("req")) == [name]


def test_typical_request_names_fit_any_file_system() -> None:
    node = NodeInfo("gpu-node-0123.cluster.example.org", 4_194_304, 7, "a1b2c3", 29500, "gpu-node-0123")
    name = encode_request_name(JoinRequest(node, "12.0123456789ab", 3), _store(SECRET).name_mac)
    assert name is not None and len(name) < 200


def test_a_request_too_long_for_a_name_falls_back_to_a_body_record() -> None:
    node = NodeInfo("x" * 200 + ".example.org", 1, 0, "a1b2c3", 1, "x" * 60)
    request = JoinRequest(node, "1.00")
    assert encode_request_name(request, _unsigned) is None
    assert request_record_name(request, _unsigned) == BODY_PREFIX + node.node_id
    assert request_owner(BODY_PREFIX + node.node_id) == node.node_id


def test_a_forged_or_unsigned_request_name_is_refused_with_a_job_secret() -> None:
    node = NodeInfo("10.0.0.1", 1, 0, "a1b2c3", 1, "h")
    signed, other = _store(SECRET), _store(b"another-secret-of-16+")
    unsigned_name = encode_request_name(JoinRequest(node, "1.0"), _unsigned)
    forged_name = encode_request_name(JoinRequest(node, "1.0"), other.name_mac)
    assert unsigned_name is not None and forged_name is not None
    for name in (unsigned_name, forged_name):
        with pytest.raises(fsrdzv.TamperedError, match="not signed"):
            decode_request_name(name, signed.name_mac)


@pytest.mark.parametrize("body", ["", "!!!", "bm90IGpzb24", "WzEsMiwzXQ", "WyJhIiwxLDAsIm4iLCJwIiwiaCIsIm4iLG51bGxd"])
def test_a_garbled_inline_name_is_a_clear_error(body: str) -> None:
    with pytest.raises(fsrdzv.StateCorruptError, match="does not decode to a join request"):
        decode_request_name(INLINE_PREFIX + body, _unsigned)


def test_names_without_the_inline_prefix_are_body_records() -> None:
    assert decode_request_name("10.0.0.1_1_0_abc", _unsigned) is None
    assert request_owner("10.0.0.1_1_0_abc") == "10.0.0.1_1_0_abc"


# -- ordered nonces ------------------------------------------------------------------------------------------


def test_nonce_order() -> None:
    assert nonce_order("12.abc") == 12
    assert [nonce_order(n) for n in ("q1", "old", ".x", "1x.y", "\u0661.x", "9" * 19 + ".x")] == [None] * 6


def test_an_older_request_is_never_folded_after_a_newer_one() -> None:
    """A stale listing (NFS caches directory listings) may still show a node's previous request."""
    settings_ = fsrdzv.Settings("run", 1, 3)
    node = NodeInfo("10.0.0.1", 1, 0, "a")
    first, second = JoinRequest(node, "1.aa"), JoinRequest(node, "2.bb", leave_round=0)
    state = fold_requests(new_state("run", "e"), [first], settings_)
    state = fold_requests(state, [second], settings_)
    assert state.applied[node.node_id] == "2.bb"
    assert pending(state, [first]) == []
    assert fold_requests(state, [first], settings_) is state
    # Given both at once, the newer wins whatever the listing order.
    fresh = new_state("run", "e")
    for order in ([first, second], [second, first]):
        assert fold_requests(fresh, order, settings_).applied[node.node_id] == "2.bb"
    # Nonces of unknown form keep the plain rule: anything but the applied nonce is pending.
    assert pending(state, [JoinRequest(node, "other")]) == [JoinRequest(node, "other")]


# -- the read budget -----------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 0.2), min_size=1, max_size=300))
def test_read_budget_allows_at_most_rate_plus_burst_reads_in_any_second(gaps: list[float]) -> None:
    clock = FakeClock()
    budget = ReadBudget(READ_RATE, READ_BURST, clock, clock.sleep)
    times = []
    for gap in gaps:
        clock.sleep(gap)
        budget.take()
        times.append(clock())
    limit = READ_RATE + READ_BURST
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u < t + 1.0 - 1e-9) <= limit


class _TimedStore(MemoryStore):
    """The memory store, recording which thread read what and when (reads, listings and record reads)."""

    log: list[tuple[str, float, str]]
    #: The request records when the round formed (before the nodes shut down and removed them).
    requests_formed: list[str]

    def _note(self, what: str) -> None:
        self.log.append((threading.current_thread().name, time.monotonic(), what))

    def read(self) -> Any:
        self._note("read")
        return super().read()

    def list_records(self, kind: str) -> dict[str, str]:
        self._note(f"list {kind}")
        return super().list_records(kind)

    def read_record(self, kind: str, name: str) -> bytes | None:
        self._note(f"get {kind}")
        return super().read_record(kind, name)


def _form(n: int, *, addr: str = "10.0.{i}.1") -> tuple[list[fsrdzv.RendezvousInfo], _TimedStore, list[dict[str, int]]]:
    name = f"scale-{uuid.uuid4().hex[:8]}"
    store_log: list[tuple[str, float, str]] = []
    handlers = []
    for i in range(n):
        store = _TimedStore(name, "run")
        store.log = store_log
        settings_ = fsrdzv.Settings("run", n, n, **{k: v for k, v in FAST.items() if k != "close_timeout"})
        handlers.append(fsrdzv.RendezvousHandler(store, settings_, local_addr=addr.format(i=i)))
    barrier = threading.Barrier(n)
    infos: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        infos[i] = handlers[i].next_rendezvous()

    threads = [threading.Thread(target=run, args=(i,), name=f"node-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ops = [dict(h.ops) for h in handlers]  # the formation's own operations, before the shutdown's
    formed = len(store_log)
    store.requests_formed = list(store.list_records("req"))
    for h in handlers:
        h.shutdown()
    del store_log[formed:]
    return infos, store, ops


def test_simultaneous_arrivals_form_with_o_n_writes_and_within_the_read_budget() -> None:
    n = 24
    infos, store, ops = _form(n)
    assert sorted(i.rank for i in infos) == list(range(n))
    assert len({i.master_port for i in infos}) == 1
    writes = sum(o["cas"] + o["put"] + o["delete"] for o in ops)
    assert writes <= 4 * n, writes
    # Only waiting members that fold list the requests; no node reads any request body (all names inline).
    assert not any(what == "get req" for _, _, what in store.log)
    by_node: dict[str, list[float]] = defaultdict(list)
    for thread, at, _ in store.log:
        by_node[thread].append(at)
    limit = READ_RATE + READ_BURST
    for thread, times in by_node.items():
        times.sort()
        worst = max(sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times))
        assert worst <= limit, (thread, worst)


def test_the_others_take_rank_0s_candidates_from_the_document() -> None:
    """Rank 0 writes its heartbeat's fields into the documents it writes (``lead``): no node reads rank 0's
    heartbeat record to learn where to connect (N - 1 reads of one object less per formation). Rank 0 arrives
    first here, so that it writes the first document whoever completes the round."""
    n = 5
    store = _TimedStore(f"lead-{uuid.uuid4().hex[:8]}", "run")
    store.log = []
    settings = fsrdzv.Settings("run", n, n, **{k: v for k, v in FAST.items() if k != "close_timeout"})
    handlers = [fsrdzv.RendezvousHandler(store, settings, local_addr=f"10.0.{i}.1") for i in range(n)]
    infos: list[Any] = [None] * n

    def run(i: int) -> None:
        infos[i] = handlers[i].next_rendezvous()

    threads = [threading.Thread(target=run, args=(i,), name=f"node-{i}") for i in range(n)]
    threads[0].start()
    deadline = time.monotonic() + 30
    while store.read() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert [i.rank for i in infos] == list(range(n))
        assert {i.master_addr for i in infos} == {"10.0.0.1"}  # rank 0's explicit local_addr
        assert not any(what == "get hb" for _, _, what in store.log)
        snap = store.read()
        assert snap is not None
        lead = decode_state(snap.data, "the document").lead
        assert lead is not None and lead["node"] == handlers[0].node_id and lead["addrs"] == ["10.0.0.1"]
    finally:
        for h in handlers:
            h.shutdown()


def test_requests_too_long_for_a_name_still_form_through_body_records() -> None:
    n = 6
    infos, store, _ = _form(n, addr="node-{i}." + "a" * 200 + ".example.org")
    assert sorted(i.rank for i in infos) == list(range(n))
    assert store.requests_formed and all(name.startswith(BODY_PREFIX) for name in store.requests_formed)


def test_a_rejoin_replaces_the_previous_request_record() -> None:
    store = _store()
    settings_ = fsrdzv.Settings("run", 1, 1, **{k: v for k, v in FAST.items() if k != "close_timeout"})
    h = fsrdzv.RendezvousHandler(store, settings_, local_addr="10.0.0.1")
    for expected in range(3):
        assert h.next_rendezvous().round == expected
        names = list(store.list_records("req"))
        assert len(names) == 1 and decode_request_name(names[0], store.name_mac).nonce.startswith(  # type: ignore[union-attr]
            f"{expected + 1}."
        )
    h.shutdown()
    assert store.list_records("req") == {}


def test_while_a_round_forms_only_its_folder_writes_the_document() -> None:
    """The first node waits as folder; two more arrive. They write only their own records (heartbeat, request):
    the folder folds them, so while a round forms the document has one writer and its writes win without a read.
    The one exception: a newcomer that sees the round lack only itself completes it with its own fold."""
    name = f"folder-{uuid.uuid4().hex[:8]}"
    handlers = [
        fsrdzv.RendezvousHandler(MemoryStore(name, "run"), fsrdzv.Settings("run", 3, 3), local_addr=f"10.0.0.{9 - i}")
        for i in range(3)
    ]
    infos: list[Any] = [None] * 3

    def run(i: int) -> None:
        infos[i] = handlers[i].next_rendezvous()

    first = threading.Thread(target=run, args=(0,))
    first.start()
    deadline = time.monotonic() + 10
    while handlers[0].store.read() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    others = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(30)
    # Writes that changed the document (a newcomer whose listing shows it the smallest identity tries to create
    # the document, and that create loses: it writes nothing).
    cas = [h.ops["cas"] - h.ops["cas_lost"] for h in handlers]
    for h in handlers:
        h.shutdown()
    assert sorted(i.rank for i in infos) == [0, 1, 2]
    # The newcomers have lower identities (10.0.0.8, 10.0.0.7): the role stayed with the first.
    assert sum(cas[1:]) <= 1  # at most the last missing participant's own fold
    assert cas[0] >= 1 + (sum(cas[1:]) == 0)  # the document's creation, then the fold(s)


def test_the_folder_is_the_waiting_member_folded_first() -> None:
    """Every node names the same folder from the document, and a newcomer never takes the role over, whatever its
    identity; when the folder leaves the waiting members, the next in folding order takes over."""
    settings_ = fsrdzv.Settings("run", 3, 3)
    late, early = (NodeInfo(addr, 1, 0, "abc") for addr in ("10.0.0.1", "10.0.0.9"))
    state = fold_requests(new_state("run", "e"), [JoinRequest(early, "1.a")], settings_)
    state = fold_requests(state, [JoinRequest(late, "1.b")], settings_)
    assert folder_of(state) == early.node_id
    assert late < early  # the newcomer sorts first, yet the folder did not change
    without_early = remove_nodes(state, [early.node_id], settings_)
    assert folder_of(without_early) == late.node_id


class _InterleavingStore(MemoryStore):
    """Records the document operations of its one handler; ``interleave`` (once armed) is another node's write,
    made just before the handler's next compare-and-set lands."""

    interleave: Any = None

    def __init__(self, name: str, run_id: str) -> None:
        super().__init__(name, run_id)
        self.log: list[str] = []

    def read(self) -> Any:
        self.log.append("read")
        return super().read()

    def compare_and_set(self, data: bytes, token: object = None) -> Any:
        other, self.interleave = self.interleave, None
        if other is not None:
            snap = super().read()
            assert snap is not None
            assert super().compare_and_set(other(snap.data), snap.token).won
        result = super().compare_and_set(data, token)
        self.log.append("cas won" if result.won else "cas lost")
        return result


def test_a_fold_on_a_stale_document_is_made_again_on_the_current_one() -> None:
    """The folder folds into the document it last saw, without reading it first. When someone else wrote in
    between (a node folding itself after FOLD_GRACE), the lost compare-and-set returns the current document and
    the fold is made again on it at once, with no read between: nothing the other writer did is lost."""
    settings_ = fsrdzv.Settings("run", 3, 4, last_call_timeout=0.3, join_timeout=20)
    store = _InterleavingStore(f"refold-{uuid.uuid4().hex[:8]}", "run")
    folder = fsrdzv.RendezvousHandler(store, settings_, local_addr="10.0.0.1")
    other, joiner = (NodeInfo(f"10.0.0.{i}", 1, 0, "abc") for i in (2, 3))
    infos: list[fsrdzv.RendezvousInfo] = []
    thread = threading.Thread(target=lambda: infos.append(folder.next_rendezvous()))
    thread.start()
    deadline = time.monotonic() + 10
    while "cas won" not in store.log and time.monotonic() < deadline:  # the folder created the document
        time.sleep(0.01)
    store.interleave = lambda data: encode_state(
        fold_requests(decode_state(data, "document"), [JoinRequest(other, "1.b")], settings_)
    )
    request = JoinRequest(joiner, "1.c")
    store.put_record("req", request_record_name(request, store.name_mac), encode_request(request))
    thread.join(20)
    folder.shutdown()
    assert infos and infos[0].world_size == 3
    assert set(infos[0].participants) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    lost = store.log.index("cas lost")
    assert store.log[lost + 1] == "cas won"  # refolded on the document the lost write returned, no read first
