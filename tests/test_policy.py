"""The decisions of a join, as pure functions of a view (``fsrdzv._policy``): table-driven and with Hypothesis.

No store, no clock, no thread: each case builds a document with the protocol's own transitions, a
:class:`JoinView` of one node, and checks the action :func:`decide` names.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fsrdzv
from fsrdzv import _periods as P
from fsrdzv import _policy as policy
from fsrdzv._admin import RunAdmin
from fsrdzv._protocol import close, fold_requests, mark_complete, new_state, remove_nodes
from fsrdzv._state import JoinRequest, NodeInfo, RendezvousState, decode_state, encode_state
from fsrdzv._stores._memory import MemoryStore

SETTINGS = fsrdzv.Settings("run", 2, 3, last_call_timeout=30.0, join_timeout=600.0)
NOW = 1000.0


def node(i: int) -> NodeInfo:
    return NodeInfo(f"10.0.0.{i}", 100, 0, "abc")


def request(i: int, n: int = 1) -> JoinRequest:
    return JoinRequest(node(i), f"{n}.r{i}")


def folded(*ids: int, state: RendezvousState | None = None) -> RendezvousState:
    """A document with the requests of ``ids`` folded one at a time (so the first is the folder)."""
    state = state or new_state("run", "epoch")
    for i in ids:
        state = fold_requests(state, [request(i)], SETTINGS)
    return state


def view(state: RendezvousState | None, me: int = 1, **changes: Any) -> policy.JoinView:
    base = policy.JoinView(
        me=node(me).node_id,
        settings=SETTINGS,
        request=request(me),
        state=state,
        now=NOW,
        deadline=NOW + 600,
        progress_at=NOW,
        own_folds=0,
        next_own=NOW,
        next_sweep=NOW + 2.5,
        last_call_seen_at=None,
        was_folder=False,
    )
    return dataclasses.replace(base, **changes)


ONE = folded(1)
TWO = folded(1, 2)  # two of min 2: last call running
COMPLETE = mark_complete(TWO, SETTINGS)
WAITING = fold_requests(COMPLETE, [request(4)], SETTINGS)  # node 4 waits for the next round (its folder)
CASES: list[tuple[str, policy.JoinView, type]] = [
    ("no document: create it", view(None), policy.CreateDocument),
    ("first arrival, nobody folds: fold own", view(new_state("run", "e")), policy.Write),
    ("a folder is at work: wait", view(ONE, me=2), policy.Poll),
    ("the folder stood still for FOLD_GRACE: fold own", view(ONE, me=2, progress_at=NOW - 6), policy.Write),
    ("own fold not before the back-off ends", view(ONE, me=2, progress_at=NOW - 6, next_own=NOW + 1), policy.Poll),
    ("complete round, nobody waits: fold own", view(COMPLETE, me=3, own_folds=3), policy.Write),
    ("complete round, never folded itself: join its wait list", view(WAITING, me=3), policy.Write),
    ("complete round, folded itself once: leave it to the folder", view(WAITING, me=3, own_folds=1), policy.Poll),
    ("folded and alone: the folder polls", view(ONE), policy.Poll),
    ("participant of the complete round: return", view(COMPLETE), policy.ReturnInfo),
    ("closed: raise", view(close(ONE), me=2), policy.RaiseClosed),
    ("folded then removed: ask again", view(remove_nodes(ONE, [node(1).node_id], SETTINGS)), policy.Rejoin),
    ("last call seen for its timeout: complete", view(TWO, last_call_seen_at=NOW - 30), policy.Write),
    ("last call still running: poll", view(TWO, last_call_seen_at=NOW - 29), policy.Poll),
    ("sweep due", view(ONE, next_sweep=NOW), policy.Sweep),
    ("past the deadline: roll back", view(ONE, me=2, deadline=NOW - 1), policy.RollBack),
    ("the one participant the round lacks: its own fold completes it", view(TWO, me=3), policy.Write),
    ("the last one missing, not before the back-off ends", view(TWO, me=3, next_own=NOW + 1), policy.Poll),
]


@pytest.mark.parametrize(("case", "expected"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_decide(case: policy.JoinView, expected: type) -> None:
    assert type(policy.decide(case)) is expected


def test_a_spare_past_the_deadline_waits_instead_of_rolling_back() -> None:
    full = fold_requests(folded(1, 2, 3), [request(4)], SETTINGS)
    spare = node(4).node_id
    assert spare in full.redundancy_list
    got = policy.decide(view(full, me=4, request=request(4), deadline=NOW - 1))
    assert isinstance(got, policy.Poll)  # torch: a spare's deadline is refreshed when it leaves the spare list


def test_a_closed_run_tells_a_spare_to_exit_normally() -> None:
    full = fold_requests(folded(1, 2, 3), [request(4)], SETTINGS)
    assert policy.decide(view(close(full), me=4)) == policy.RaiseClosed(spare=True)


def test_a_node_that_just_became_the_folder_looks_at_once() -> None:
    assert policy.decide(view(ONE)) == policy.Poll(folder=True, look_now=True)
    assert policy.decide(view(ONE, was_folder=True)) == policy.Poll(folder=True, look_now=False)


def test_the_writes_the_policy_asks_for() -> None:
    own = policy.decide(view(ONE, me=2, progress_at=NOW - 6))
    assert isinstance(own, policy.Write) and own.why == "fold own"
    assert node(2).node_id in own.state.participants
    done = policy.decide(view(TWO, last_call_seen_at=NOW - 30))
    assert isinstance(done, policy.Write) and done.why == "complete" and done.state.complete


def test_the_last_missing_participant_completes_the_round_with_its_own_fold() -> None:
    done = policy.decide(view(TWO, me=3))
    assert isinstance(done, policy.Write) and done.why == "fold own" and done.state.complete
    assert policy.last_missing(view(TWO, me=3), TWO)
    assert not policy.last_missing(view(ONE, me=3), ONE)  # two are missing: the folder folds them
    assert not policy.last_missing(view(TWO, me=2), TWO)  # already a participant
    assert not policy.last_missing(view(COMPLETE, me=3), COMPLETE)  # a complete round: it waits for the next


def test_the_smallest_identity_creates_the_document_with_every_request_folded() -> None:
    listed = [request(3), request(2), request(5)]
    assert policy.creator(view(None, me=3), listed) == node(2).node_id
    assert policy.creator(view(None, me=2), listed) == node(2).node_id
    assert policy.creator(view(None, me=1), listed) == node(1).node_id  # its own request, not yet listed
    assert policy.creator(view(None, me=3), None) == node(3).node_id  # a big job does not list: every node creates
    first = policy.create_document(view(None, me=2), "e", listed)
    assert set(first.participants) == {node(i).node_id for i in (2, 3, 5)} and first.complete
    assert first.participants[node(2).node_id] == 0  # the creator is rank 0 of the round it completes
    partial = policy.create_document(view(None, me=3), "e", [request(3), request(5)])
    assert policy.folder_of(partial) == node(3).node_id and not partial.complete  # the creator folds what follows
    assert policy.create_document(view(None, me=2), "e").applied == {node(2).node_id: request(2).nonce}


def test_a_node_that_left_the_creation_to_another_looks_again_soon_and_creates_once_it_is_overdue() -> None:
    periods = P.Periods.of(SETTINGS)
    assert periods.creator_wait(0.01) == pytest.approx(P.CREATE_WAIT_TRIPS * 0.01)
    assert periods.creator_wait(None) == periods.fast == periods.creator_wait(10.0)
    big = P.Periods.of(fsrdzv.Settings("run", 4096, 4096))
    assert big.creator_wait(0.01) == big.floor  # never under the big jobs' poll floor
    assert not periods.creator_overdue(P.CREATE_GRACE - 0.01) and periods.creator_overdue(P.CREATE_GRACE)
    assert not big.creator_overdue(P.CREATE_GRACE) and big.creator_overdue(P.FOLDER_READ_EVERY * big.fast)


@pytest.mark.parametrize(
    ("changed", "idle", "expected"),
    [(True, False, "fast"), (False, False, "grows to forming"), (False, True, "grows to slow")],
    ids=["changed", "forming", "idle"],
)
def test_poll_period(changed: bool, idle: bool, expected: str) -> None:
    periods = P.Periods.of(SETTINGS)
    poll = periods.fast
    for _ in range(50):
        poll = periods.next_poll(poll, changed=changed, idle=idle)
    limit = {"fast": periods.fast, "grows to forming": periods.forming, "grows to slow": periods.slow}[expected]
    assert poll == pytest.approx(limit)


@pytest.mark.parametrize(
    ("gone", "waited", "verdict"),
    [
        ({"a", "b"}, 0.0, "wait"),
        ({"a", "b"}, SETTINGS.keep_alive_interval, "restart"),
        ({"a"}, 1.0, "wait"),
        ({"a"}, 100.0, "closed"),
    ],
    ids=["all-gone-at-first-look", "all-gone-for-an-interval", "look-again", "still-alive"],
)
def test_reuse_verdict(gone: set[str], waited: float, verdict: str) -> None:
    assert policy.reuse_verdict(gone, {"a", "b"}, waited, SETTINGS) == verdict


# -- properties ------------------------------------------------------------------------------------------------

ids = st.lists(st.integers(1, 40), min_size=1, max_size=12, unique=True)


@given(ids, st.integers(0, 4))
def test_exactly_one_folder_among_waiting_members(order: list[int], removed: int) -> None:
    settings = fsrdzv.Settings("run", 50, 60)
    state = new_state("run", "e")
    for i in order:
        state = fold_requests(state, [request(i)], settings)
    state = remove_nodes(state, [node(i).node_id for i in order[:removed]], settings)
    waiting = policy.waiting(state)
    folders = [m for m in waiting if policy.folder_of(state) == m]
    assert len(folders) == (1 if waiting else 0)
    assert policy.anyone_waiting(state) == bool(waiting)
    if waiting:
        assert policy.folder_of(state) == node(order[removed]).node_id  # the first folded of those left


@given(
    st.integers(1, 5000),
    st.floats(0.1, 60),
    st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60),
)
def test_poll_period_stays_within_bounds(max_nodes: int, interval: float, steps: list[tuple[bool, bool]]) -> None:
    settings = fsrdzv.Settings("run", 1, max_nodes, keep_alive_interval=interval)
    periods = P.Periods.of(settings)
    poll = periods.fast
    for changed, idle in steps:
        poll = periods.next_poll(poll, changed=changed, idle=idle)
        assert periods.fast <= poll <= max(periods.slow, periods.forming)
    assert periods.fast >= max(P.FAST_POLL, max_nodes / P.AGGREGATE_READ_RATE)


@given(ids, st.data())
def test_a_complete_round_with_this_node_as_participant_always_returns(order: list[int], data: st.DataObject) -> None:
    settings = fsrdzv.Settings("run", 1, len(order))
    state = fold_requests(new_state("run", "e"), [request(i) for i in order], settings)
    assert state.complete
    me = data.draw(st.sampled_from(order))
    closed = data.draw(st.booleans())
    v = view(
        close(state) if closed else state,
        me=me,
        settings=settings,
        now=data.draw(st.floats(0, 1e6)),
        deadline=data.draw(st.floats(0, 1e6)),
        next_sweep=data.draw(st.floats(0, 1e6)),
    )
    assert isinstance(policy.decide(v), policy.ReturnInfo)


# -- interoperability with the previous engine -----------------------------------------------------------------

#: A document written by fsrdzv at e997608 (before the engine redesign): two nodes formed round 0, a third waits.
OLD_DOCUMENT = Path(__file__).with_name("data") / "document-e997608.json"


def test_a_document_written_by_the_old_engine_is_read_and_joined() -> None:
    """The old engine's document decodes unchanged (schema 1; the new encoder writes the same bytes), and a new
    handler joins the wait list of its complete round, keeping everything the old nodes wrote."""
    data = OLD_DOCUMENT.read_bytes().strip()
    old = decode_state(data, "fixture")
    assert old.complete and len(old.participants) == 2 and len(old.wait_list) == 1
    assert encode_state(old) == data
    store = MemoryStore(f"interop-{uuid.uuid4().hex[:8]}", old.run_id)
    assert store.compare_and_set(data, None).won
    settings = fsrdzv.Settings(old.run_id, 2, 4, join_timeout=30.0)
    handler = fsrdzv.RendezvousHandler(store, settings, local_addr="10.9.9.9")
    errors: list[BaseException] = []

    def join() -> None:
        try:
            handler.next_rendezvous()
        except fsrdzv.RendezvousError as exc:
            errors.append(exc)

    thread = threading.Thread(target=join)
    thread.start()
    deadline = time.monotonic() + 10
    joined = old
    while handler.node_id not in joined.wait_list and time.monotonic() < deadline:
        time.sleep(0.02)
        snap = store.read()
        assert snap is not None
        joined = decode_state(snap.data, "document")
    RunAdmin(store).close(5.0)  # the old job ends; the new node stops waiting
    thread.join(10)
    handler.shutdown()
    assert handler.node_id in joined.wait_list
    assert dict(joined.participants) == dict(old.participants) and joined.roster == old.roster
    assert joined.round == old.round and joined.epoch == old.epoch and set(old.wait_list) <= set(joined.wait_list)
    assert errors and isinstance(errors[0], fsrdzv.RendezvousClosedError)


def test_the_old_engine_reads_what_the_new_one_writes(tmp_path: Path) -> None:
    """The decoder of e997608 (run from git in a subprocess) accepts a document the new engine wrote."""
    root = Path(__file__).resolve().parent.parent
    old_state = subprocess.run(
        ["git", "-C", str(root), "show", "e997608:fsrdzv/_state.py"], capture_output=True, text=True, check=False
    )
    if old_state.returncode != 0:
        pytest.skip("the old commit is not in this checkout")
    pkg = tmp_path / "oldfsrdzv"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    errors = subprocess.run(
        ["git", "-C", str(root), "show", "e997608:fsrdzv/_errors.py"], capture_output=True, text=True, check=True
    )
    (pkg / "_errors.py").write_text(errors.stdout)
    (pkg / "_state.py").write_text(old_state.stdout)
    state = fold_requests(folded(1, 2, 3), [request(4)], SETTINGS)
    doc = tmp_path / "doc.json"
    doc.write_bytes(encode_state(state))
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from oldfsrdzv._state import decode_state;"
        "s = decode_state(open(sys.argv[2], 'rb').read(), 'doc');"
        "print(json.dumps([s.generation, sorted(s.participants), list(s.redundancy_list), s.complete]))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(doc)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    generation, participants, spares, complete = json.loads(out.stdout)
    assert generation == state.generation and participants == sorted(state.participants)
    assert spares == list(state.redundancy_list) and complete == state.complete
