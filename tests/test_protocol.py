"""Pure-decision tests of every protocol rule (``fsrdzv._protocol``), table-driven.

Each case is a short script of protocol steps on a fresh state, followed by the expected outcome. The steps are
the pure transitions the handler performs (fold join requests, remove dead nodes, complete after last call, close,
restart); nothing here touches storage or a clock. Node names ``a``, ``b``, ... sort in that order (their
addresses do), so ranks are easy to read off.

The cases port the rules behind torch's ``dynamic_rendezvous_test.py`` (join/exit op tables, executor actions,
sanitizer epilogue) to our batched design, plus the deliberate differences listed in ``_protocol``'s docstring.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from fsrdzv import _protocol as proto
from fsrdzv._protocol import (
    close,
    complete_round,
    fold_requests,
    mark_complete,
    new_state,
    pending,
    remove_nodes,
    restart,
    stamp_lead,
)
from fsrdzv._settings import Settings
from fsrdzv._state import APPLIED_HISTORY, JoinRequest, NodeInfo, RendezvousState

RUN = "job-1"


def make_node(name: str, *, addr: str | None = None, pid: int = 4242, local_id: int = 0, nonce: str = "n0") -> NodeInfo:
    index = ord(name[0]) - ord("a") if len(name) == 1 else 0
    return NodeInfo(addr or f"10.0.0.{name}", pid, local_id, nonce, port=29500 + index, host=f"host-{name}")


NODES: dict[str, NodeInfo] = {name: make_node(name) for name in "abcdefgh"}
NAME_OF: dict[str, str] = {info.node_id: name for name, info in NODES.items()}
NAME_OF_ADDR: dict[str, str] = {info.addr: name for name, info in NODES.items()}


def nid(name: str) -> str:
    return NODES[name].node_id


class Script:
    """Runs protocol steps against one state, minting a fresh request nonce for every join."""

    def __init__(self, min_nodes: int, max_nodes: int) -> None:
        self.settings = Settings(run_id=RUN, min_nodes=min_nodes, max_nodes=max_nodes)
        self.state = new_state(RUN, "epoch-0")
        self._nonces = itertools.count(1)
        self.last_batch: list[JoinRequest] = []
        self.history: list[RendezvousState] = [self.state]

    def request(self, name: str) -> JoinRequest:
        node = NODES[name]
        leave = self.state.round if node.node_id in self.state.participants else None
        return JoinRequest(node, f"q{next(self._nonces)}", leave)

    def join(self, *names: str) -> Script:
        self.last_batch = [self.request(n) for n in names]
        return self._set(fold_requests(self.state, self.last_batch, self.settings))

    def refold(self) -> Script:
        return self._set(fold_requests(self.state, self.last_batch, self.settings))

    def die(self, *names: str) -> Script:
        return self._set(remove_nodes(self.state, [nid(n) for n in names], self.settings))

    def complete(self) -> Script:
        return self._set(mark_complete(self.state, self.settings))

    def close(self) -> Script:
        return self._set(close(self.state))

    def restart(self) -> Script:
        return self._set(restart(self.state, f"epoch-{len(self.history)}"))

    def _set(self, state: RendezvousState) -> Script:
        self.state = state
        self.history.append(state)
        return self

    def run(self, steps: Sequence[tuple[str, ...]]) -> Script:
        for op, *args in steps:
            getattr(self, op)(*args)
        return self


def view(state: RendezvousState) -> dict[str, Any]:
    """The state with node ids replaced by the short names used in the tables."""
    return {
        "participants": {NAME_OF[k]: v for k, v in state.participants.items()},
        "wait": {NAME_OF[k] for k in state.wait_list},
        "spare": {NAME_OF[k] for k in state.redundancy_list},
        "round": state.round,
        "complete": state.complete,
        "closed": state.closed,
        "last_call": state.last_call,
        "generation": state.generation,
        "master": state.master,
        "roster": "".join(NAME_OF_ADDR[a] for a in state.roster),
    }


def master_of(name: str) -> tuple[str, int]:
    return (NODES[name].addr, NODES[name].port)


@dataclass(frozen=True)
class Case:
    id: str
    min_nodes: int
    max_nodes: int
    steps: Sequence[tuple[str, ...]]
    expect: dict[str, Any] = field(default_factory=dict)


# Expected values name only what the rule is about; ranks are 0 until a round completes.
# fmt: off
CASES = [
    # -- formation (join rule 7, ADD_TO_PARTICIPANTS) -------------------------------------------------------------
    Case("first-join-creates-participant", 2, 3, [("join", "a")],
         {"participants": {"a": 0}, "wait": set(), "spare": set(), "complete": False, "last_call": None,
          "round": 0, "generation": 1, "master": None}),
    Case("below-min-no-last-call", 3, 4, [("join", "a"), ("join", "b")],
         {"participants": {"a": 0, "b": 0}, "last_call": None, "complete": False}),
    Case("reaching-min-starts-last-call-at-that-generation", 2, 3, [("join", "a"), ("join", "b")],
         {"participants": {"a": 0, "b": 0}, "last_call": 2, "complete": False, "generation": 2}),
    Case("reaching-min-in-one-batch", 2, 4, [("join", "b", "a")],
         {"participants": {"a": 0, "b": 0}, "last_call": 1, "generation": 1}),
    Case("growing-past-min-keeps-the-mark", 2, 4, [("join", "a"), ("join", "b"), ("join", "c")],
         {"participants": {"a": 0, "b": 0, "c": 0}, "last_call": 2, "generation": 3, "complete": False}),
    Case("batch-growing-past-min-keeps-the-mark", 1, 4, [("join", "a"), ("join", "b", "c")],
         {"last_call": 1, "generation": 2}),
    Case("reaching-max-completes-at-once", 2, 3, [("join", "c", "a", "b")],
         {"participants": {"a": 0, "b": 1, "c": 2}, "complete": True, "last_call": None, "master": master_of("a"),
          "generation": 1, "roster": "abc"}),
    Case("reaching-max-after-min", 2, 3, [("join", "b"), ("join", "c"), ("join", "a")],
         {"participants": {"a": 0, "b": 1, "c": 2}, "complete": True, "last_call": None, "master": master_of("a")}),
    Case("min-equals-max-one-node", 1, 1, [("join", "a")],
         {"participants": {"a": 0}, "complete": True, "master": master_of("a")}),
    Case("arrivals-beyond-max-in-the-completing-batch-are-spares", 1, 2, [("join", "d", "c", "b", "a")],
         {"participants": {"a": 0, "b": 1}, "spare": {"c", "d"}, "wait": set(), "complete": True}),
    # -- last call (join rule 6, MARK_RENDEZVOUS_COMPLETE) -------------------------------------------------------
    Case("mark-complete-after-last-call", 2, 4, [("join", "c", "a"), ("complete",)],
         {"participants": {"a": 0, "c": 1}, "complete": True, "last_call": None, "master": master_of("a"),
          "generation": 2}),
    Case("mark-complete-below-min-is-a-no-op", 2, 4, [("join", "a"), ("complete",)],
         {"participants": {"a": 0}, "complete": False, "generation": 1}),
    Case("mark-complete-on-complete-round-is-a-no-op", 1, 4, [("join", "a"), ("complete",), ("complete",)],
         {"complete": True, "generation": 2}),
    Case("mark-complete-on-closed-run-is-a-no-op", 1, 4, [("join", "a"), ("close",), ("complete",)],
         {"complete": False, "closed": True, "generation": 2}),
    Case("mark-complete-with-nobody-is-a-no-op", 1, 4, [("complete",)],
         {"complete": False, "generation": 0, "participants": {}}),
    # -- late nodes (join rule 5) ------------------------------------------------------------------------------
    Case("late-node-on-complete-non-full-round-waits", 1, 3, [("join", "a", "b"), ("complete",), ("join", "c")],
         {"participants": {"a": 0, "b": 1}, "wait": {"c"}, "spare": set(), "complete": True, "round": 0}),
    Case("late-nodes-in-one-batch-wait", 1, 4, [("join", "a"), ("complete",), ("join", "c", "b")],
         {"participants": {"a": 0}, "wait": {"b", "c"}, "complete": True}),
    Case("late-node-on-full-round-is-a-spare", 1, 2, [("join", "a", "b"), ("join", "c")],
         {"participants": {"a": 0, "b": 1}, "wait": set(), "spare": {"c"}, "complete": True}),
    Case("waiter-asking-again-stays-waiting", 1, 3, [("join", "a"), ("complete",), ("join", "b"), ("join", "b")],
         {"participants": {"a": 0}, "wait": {"b"}, "spare": set(), "generation": 4}),
    Case("spare-asking-again-stays-spare-while-full", 1, 2, [("join", "a", "b"), ("join", "c"), ("join", "c")],
         {"participants": {"a": 0, "b": 1}, "spare": {"c"}, "wait": set()}),
    # -- participants asking again (exit op, then join) -----------------------------------------------------------
    Case("participant-rejoins-incomplete-round-above-min", 2, 4, [("join", "a", "b", "c"), ("join", "a")],
         {"participants": {"a": 0, "b": 0, "c": 0}, "last_call": 1, "generation": 2, "complete": False}),
    Case("participant-rejoins-at-min-restarts-last-call", 2, 4, [("join", "a", "b"), ("join", "a")],
         {"participants": {"a": 0, "b": 0}, "last_call": 2, "generation": 2}),
    Case("participant-of-complete-round-leaves-then-waits", 1, 3, [("join", "a", "b"), ("complete",), ("join", "a")],
         {"participants": {"b": 1}, "wait": {"a"}, "complete": True, "round": 0, "master": master_of("a"),
          "roster": "ab"}),
    Case("last-participant-leaving-advances-the-round", 1, 3,
         [("join", "a", "b"), ("complete",), ("join", "a"), ("join", "b")],
         {"participants": {"a": 0, "b": 0}, "wait": set(), "round": 1, "complete": False, "last_call": 4,
          "master": None, "roster": "", "generation": 4}),
    Case("whole-round-rejoining-in-one-batch-advances-once", 1, 3,
         [("join", "a", "b"), ("complete",), ("join", "b", "a")],
         {"participants": {"a": 0, "b": 0}, "round": 1, "complete": False, "last_call": 3, "generation": 3}),
    Case("advance-moves-waiters-in-and-completes-at-max", 1, 3,
         [("join", "a", "b"), ("complete",), ("join", "c"), ("join", "a"), ("join", "b")],
         {"participants": {"a": 0, "b": 1, "c": 2}, "wait": set(), "spare": set(), "round": 1, "complete": True,
          "master": master_of("a")}),
    Case("advance-sends-waiters-beyond-max-to-spares", 1, 2,
         [("join", "a"), ("complete",), ("join", "d", "c", "b"), ("join", "a")],
         {"participants": {"b": 0, "c": 1}, "wait": set(), "spare": {"a", "d"}, "round": 1, "complete": True}),
    Case("rejoining-full-round-participant-becomes-spare-when-others-wait", 1, 2,
         [("join", "a", "b"), ("join", "c"), ("join", "a")],
         {"participants": {"b": 1}, "wait": {"a", "c"}, "spare": set(), "complete": True, "round": 0}),
    # -- deaths (sanitizer epilogue, plus spare promotion) --------------------------------------------------------
    Case("death-below-min-clears-last-call", 2, 4, [("join", "a"), ("join", "b"), ("die", "b")],
         {"participants": {"a": 0}, "last_call": None, "generation": 3, "complete": False}),
    Case("death-above-min-keeps-last-call", 2, 4, [("join", "a", "b"), ("join", "c"), ("die", "c")],
         {"participants": {"a": 0, "b": 0}, "last_call": 1, "generation": 3}),
    Case("death-in-complete-round-keeps-it-complete", 1, 3, [("join", "a", "b"), ("complete",), ("die", "a")],
         {"participants": {"b": 1}, "complete": True, "round": 0, "roster": "ab"}),
    Case("death-of-last-participant-advances-the-round", 1, 3, [("join", "a", "b"), ("complete",), ("die", "a", "b")],
         {"participants": {}, "round": 1, "complete": False, "last_call": None, "master": None}),
    Case("death-of-last-participant-moves-waiters-in", 1, 3,
         [("join", "a"), ("complete",), ("join", "c", "b"), ("die", "a")],
         {"participants": {"b": 0, "c": 0}, "wait": set(), "round": 1, "complete": False, "last_call": 4}),
    Case("death-of-participant-promotes-spares-to-wait-list", 1, 2,
         [("join", "a", "b"), ("join", "c", "d"), ("die", "a")],
         {"participants": {"b": 1}, "wait": {"c", "d"}, "spare": set(), "complete": True, "round": 0}),
    Case("death-of-spare-changes-nothing-else", 1, 2, [("join", "a", "b"), ("join", "c"), ("die", "c")],
         {"participants": {"a": 0, "b": 1}, "spare": set(), "complete": True, "generation": 3}),
    Case("death-of-waiter", 1, 3, [("join", "a"), ("complete",), ("join", "b"), ("die", "b")],
         {"participants": {"a": 0}, "wait": set(), "complete": True, "generation": 4}),
    Case("death-of-unknown-node-is-a-no-op", 1, 3, [("join", "a"), ("die", "h")],
         {"participants": {"a": 0}, "generation": 1}),
    # -- close (close op) -----------------------------------------------------------------------------------------
    Case("close-sets-closed-and-bumps-generation", 1, 3, [("join", "a"), ("close",)],
         {"closed": True, "generation": 2, "participants": {"a": 0}}),
    Case("close-is-idempotent", 1, 3, [("join", "a"), ("close",), ("close",)], {"closed": True, "generation": 2}),
    Case("closed-run-ignores-new-nodes", 1, 3, [("join", "a"), ("close",), ("join", "b")],
         {"closed": True, "participants": {"a": 0}, "wait": set(), "generation": 2}),
    Case("closed-run-ignores-rejoining-participants", 1, 3,
         [("join", "a", "b"), ("complete",), ("close",), ("join", "a")],
         {"closed": True, "participants": {"a": 0, "b": 1}, "complete": True, "generation": 3}),
    Case("closed-run-still-drops-dead-nodes-and-stays-closed", 1, 3,
         [("join", "a", "b"), ("complete",), ("close",), ("die", "a", "b")],
         {"closed": True, "participants": {}, "round": 1, "generation": 4}),
    # -- restart (run id reuse) -----------------------------------------------------------------------------------
    Case("restart-keeps-only-the-generation", 1, 2, [("join", "a", "b"), ("join", "c"), ("close",), ("restart",)],
         {"closed": False, "participants": {}, "wait": set(), "spare": set(), "round": 0, "complete": False,
          "last_call": None, "master": None, "roster": "", "generation": 4}),
    Case("restarted-run-forms-afresh", 1, 2, [("join", "a", "b"), ("close",), ("restart",), ("join", "c")],
         {"closed": False, "participants": {"c": 0}, "round": 0, "complete": False, "last_call": 4, "generation": 4}),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule(case: Case) -> None:
    script = Script(case.min_nodes, case.max_nodes).run(case.steps)
    got = view(script.state)
    assert {key: got[key] for key in case.expect} == case.expect
    # Whatever the rule, the document stays well formed.
    assert_well_formed(script.state, script.settings)


def assert_well_formed(state: RendezvousState, settings: Settings) -> None:
    lists = [*state.participants, *state.wait_list, *state.redundancy_list]
    assert len(lists) == len(set(lists)), "a node is in more than one list"
    assert set(lists) == set(state.nodes), "identity entries do not match the lists"
    assert len(state.participants) <= settings.max_nodes
    if state.complete:
        assert state.last_call is None and state.master is not None
        assert len(set(state.participants.values())) == len(state.participants)
        for node_id, rank in state.participants.items():
            assert state.roster[rank] == state.nodes[node_id].addr
    else:
        assert state.master is None and not state.roster
        assert not state.wait_list and not state.redundancy_list
        assert set(state.participants.values()) <= {0}


# -- rank assignment -----------------------------------------------------------------------------------------------

# fmt: off
RANK_ORDERS = [
    # Ranks follow (addr as a string, pid, local_id, nonce); the expected lists are node ids in rank order.
    ("addr-compared-as-string",
     [NodeInfo("node2", 1, 0, "x"), NodeInfo("node10", 1, 0, "x"), NodeInfo("node1", 1, 0, "x")],
     ["node1_1_0_x", "node10_1_0_x", "node2_1_0_x"]),
    ("ip-compared-as-string", [NodeInfo("10.0.0.9", 1, 0, "x"), NodeInfo("10.0.0.10", 1, 0, "x")],
     ["10.0.0.10_1_0_x", "10.0.0.9_1_0_x"]),
    ("pid-compared-as-number", [NodeInfo("h", 10, 0, "x"), NodeInfo("h", 9, 0, "x"), NodeInfo("h", 100, 0, "x")],
     ["h_9_0_x", "h_10_0_x", "h_100_0_x"]),
    ("local-id-breaks-pid-ties", [NodeInfo("h", 1, 3, "x"), NodeInfo("h", 1, 1, "x"), NodeInfo("h", 1, 2, "x")],
     ["h_1_1_x", "h_1_2_x", "h_1_3_x"]),
    ("nonce-breaks-full-ties", [NodeInfo("h", 1, 0, "b"), NodeInfo("h", 1, 0, "a")], ["h_1_0_a", "h_1_0_b"]),
    ("port-and-host-do-not-matter",
     [NodeInfo("h", 1, 0, "x", port=1, host="a"), NodeInfo("g", 1, 0, "x", port=2, host="z")],
     ["g_1_0_x", "h_1_0_x"]),
]
# fmt: on


@pytest.mark.parametrize(("given", "expected"), [c[1:] for c in RANK_ORDERS], ids=[c[0] for c in RANK_ORDERS])
def test_ranks_follow_sorted_identity(given: list[NodeInfo], expected: list[str]) -> None:
    settings = Settings(run_id=RUN, min_nodes=1, max_nodes=len(given))
    for order in (given, list(reversed(given))):
        state = fold_requests(new_state(RUN, "e"), [JoinRequest(n, "q") for n in order], settings)
        assert state.complete
        assert sorted(state.participants, key=lambda i: state.participants[i]) == expected
        assert state.master == (state.nodes[expected[0]].addr, state.nodes[expected[0]].port)


def test_complete_assigns_dense_ranks_and_master() -> None:
    script = Script(1, 8).join("e", "c", "a", "d")
    state = complete_round(script.state)
    assert state.participants == {nid("a"): 0, nid("c"): 1, nid("d"): 2, nid("e"): 3}
    assert state.master == master_of("a")
    assert state.complete and state.last_call is None


def test_master_is_published_for_every_round() -> None:
    """torch 2.13 caches round 0's bootstrap address (defect 13.1); the document carries each round's master."""
    script = Script(1, 2).join("b", "c").join("a")  # a is a spare of round 0, master is b
    assert script.state.master == master_of("b")
    script.die("b")  # a is promoted to the wait list
    script.join("c")  # c leaves: last participant, round 1 is a + c, full -> complete
    assert script.state.round == 1 and script.state.complete
    assert script.state.participants == {nid("a"): 0, nid("c"): 1}
    assert script.state.master == master_of("a")


def test_only_rank_0_stamps_its_candidates() -> None:
    """The document carries the heartbeat fields of the node that is (or would be, at completion) rank 0 when that
    node writes; nobody else's."""
    lead = {"node": nid("b"), "addrs": ["10.0.0.2"], "host": "b", "boot": "0123456789ab"}
    script = Script(3, 3).join("c")
    assert stamp_lead(script.state, lead) is script.state  # b is no participant yet
    script.join("b")
    assert not script.state.complete
    forming = stamp_lead(script.state, lead)  # b would be rank 0 of these two
    assert forming.lead == lead and forming.generation == script.state.generation
    assert stamp_lead(forming, lead) is forming  # already there: no change
    assert stamp_lead(script.state, {**lead, "node": nid("c")}) is script.state  # c would be rank 1
    assert stamp_lead(script.state, None) is script.state  # an administrative tool
    script.state = forming
    script.join("a")  # a smaller identity completes the round: the lead kept names a node that is not rank 0
    assert script.state.complete and script.state.participants[nid("a")] == 0
    assert script.state.lead == lead
    assert stamp_lead(script.state, {"node": nid("a"), "addrs": ["10.0.0.1"]}).lead == {
        "node": nid("a"),
        "addrs": ["10.0.0.1"],
    }
    assert stamp_lead(script.state, lead) is script.state  # b is rank 1 now


def test_the_next_round_drops_the_last_rounds_lead() -> None:
    script = Script(1, 2).join("b", "c").join("a")  # a is a spare of round 0, master is b
    script.state = stamp_lead(script.state, {"node": nid("b"), "addrs": ["10.0.0.2"]})
    script.die("b")
    script.join("c")  # round 1: a + c
    assert script.state.round == 1 and script.state.complete and script.state.lead is None


# -- folding -------------------------------------------------------------------------------------------------------


def test_fold_is_idempotent() -> None:
    script = Script(2, 4).join("a", "b", "c")
    before = script.state
    script.refold()
    assert script.state is before
    assert fold_requests(before, [], script.settings) is before


def test_fold_skips_already_applied_requests_but_applies_new_ones() -> None:
    script = Script(1, 4).join("a", "b")
    first = script.last_batch
    new = JoinRequest(NODES["c"], "fresh")
    state = fold_requests(script.state, [*first, new], script.settings)
    assert set(state.participants) == {nid("a"), nid("b"), nid("c")}
    assert state.generation == script.state.generation + 1
    assert pending(state, [*first, new]) == []


def test_same_request_twice_in_one_batch_is_folded_once() -> None:
    """A listing can hold a node's request and the handler may add its own copy: the duplicate must not act as an
    exit-and-rejoin (which would split a round that just completed at max)."""
    settings = Settings(run_id=RUN, min_nodes=2, max_nodes=2)
    a, b = JoinRequest(NODES["a"], "1"), JoinRequest(NODES["b"], "1")
    for batch in ([a, b, b], [a, a, b], [b, a, b, a]):
        state = fold_requests(new_state(RUN, "e"), batch, settings)
        assert state.complete and state.participants == {nid("a"): 0, nid("b"): 1}
        assert not state.wait_list and state.generation == 1


def test_generation_increments_exactly_once_per_fold() -> None:
    script = Script(1, 3)
    script.join("a", "b", "c", "d", "e", "f")  # completes at max mid-batch, then spares
    assert script.state.generation == 1
    script.join("a", "b", "g")  # leaves, promotions and joins in one fold
    assert script.state.generation == 2


def test_pending_compares_nonces_per_node() -> None:
    script = Script(1, 4).join("a")
    old = script.last_batch[0]
    assert pending(script.state, [old]) == []
    again = JoinRequest(NODES["a"], "other-nonce")
    assert pending(script.state, [old, again]) == [again]


def test_remove_nodes_bumps_generation_once_and_ignores_strangers() -> None:
    script = Script(1, 4).join("a", "b", "c")
    state = remove_nodes(script.state, [nid("a"), nid("b"), nid("h"), nid("a")], script.settings)
    assert state.generation == script.state.generation + 1
    assert set(state.participants) == {nid("c")}
    assert remove_nodes(state, [nid("h")], script.settings) is state
    assert remove_nodes(state, [], script.settings) is state


def test_removed_node_loses_identity_but_keeps_applied_nonce() -> None:
    """A dead node's stale request record must not bring it back: its nonce stays in ``applied``."""
    script = Script(1, 4).join("a", "b")
    stale = script.last_batch
    script.die("a")
    assert nid("a") not in script.state.nodes
    assert fold_requests(script.state, stale, script.settings) is script.state


def test_no_op_transitions_return_the_same_object() -> None:
    script = Script(2, 4).join("a")
    s = script.state
    assert mark_complete(s, script.settings) is s
    closed = close(s)
    assert close(closed) is closed
    assert fold_requests(closed, [JoinRequest(NODES["b"], "x")], script.settings) is closed
    assert mark_complete(closed, script.settings) is closed


# -- restart -------------------------------------------------------------------------------------------------------


def test_restart_is_a_fresh_epoch_with_only_the_generation() -> None:
    script = Script(1, 2).join("a", "b").join("c").close()
    old = script.state
    fresh = restart(old, "epoch-new")
    # The generation keeps climbing; `applied` is kept so old request records can never be folded again.
    assert fresh == new_state(RUN, "epoch-new", old.generation + 1).evolve(applied=dict(old.applied))
    assert fresh.epoch != old.epoch and fresh.run_id == old.run_id
    assert not fresh.closed and not fresh.members() and not fresh.nodes
    assert fresh.master is None and fresh.round == 0 and fresh.last_call is None


def test_restart_does_not_readmit_a_dead_node_of_the_old_job() -> None:
    settings = Settings(run_id=RUN, min_nodes=2, max_nodes=2)
    old_a, old_b, old_c = (JoinRequest(NODES[n], "old") for n in "abc")
    state = fold_requests(new_state(RUN, "job1"), [old_a, old_b], settings)  # a, b complete
    state = fold_requests(state, [old_c], settings)  # c is a spare
    state = remove_nodes(state, [nid("c")], settings)  # c is SIGKILLed; its req record stays in the store
    state = close(state)  # a and b finish; shutdown deletes their records, not c's
    state = restart(state, "job2")  # a new job reuses the run id
    new_d = JoinRequest(NODES["d"], "new")
    state = fold_requests(state, [old_c, new_d], settings)  # the new node folds every record it lists
    assert nid("c") not in state.members(), "a dead node of the old job became a member of the new one"


# -- applied history -----------------------------------------------------------------------------------------------


def test_applied_history_is_trimmed_to_the_newest_departed_nodes() -> None:
    settings = Settings(run_id=RUN, min_nodes=1, max_nodes=4)
    members = [NodeInfo("m", 1, i, "x") for i in range(2)]
    state = fold_requests(new_state(RUN, "e"), [JoinRequest(n, "q") for n in members], settings)
    gone = {f"gone_{i:05d}": f"n{i}" for i in range(APPLIED_HISTORY + 10)}
    state = state.evolve(applied={**gone, **state.applied})
    state = fold_requests(state, [JoinRequest(NodeInfo("m", 1, 9, "x"), "q")], settings)
    # Every current member keeps its entry; of the departed nodes, exactly APPLIED_HISTORY survive, oldest dropped.
    assert all(state.applied.get(m) is not None for m in state.members())
    departed = [k for k in state.applied if k not in state.members()]
    assert len(departed) == APPLIED_HISTORY
    assert "gone_00000" not in state.applied and f"gone_{APPLIED_HISTORY + 9:05d}" in state.applied


def test_applied_history_under_the_limit_is_kept() -> None:
    script = Script(1, 2).join("a", "b").die("a").die("b")
    assert set(script.state.applied) == {nid("a"), nid("b")}


def test_trimming_also_happens_on_removal() -> None:
    settings = Settings(run_id=RUN, min_nodes=1, max_nodes=4)
    state = fold_requests(new_state(RUN, "e"), [JoinRequest(NODES["a"], "q")], settings)
    state = state.evolve(applied={**{f"g{i:05d}": "n" for i in range(APPLIED_HISTORY + 1)}, **state.applied})
    state = remove_nodes(state, [nid("a")], settings)
    assert len(state.applied) == APPLIED_HISTORY


# -- module surface ------------------------------------------------------------------------------------------------


def test_protocol_is_pure() -> None:
    """No I/O or clock: the module imports nothing that reads time, files or the network."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(proto))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"time", "os", "socket", "datetime", "random", "secrets", "pathlib", "io"}


TRANSITIONS: list[tuple[str, Callable[[RendezvousState, Settings], RendezvousState]]] = [
    ("fold", lambda s, st: fold_requests(s, [JoinRequest(NODES["c"], "z")], st)),
    ("remove", lambda s, st: remove_nodes(s, [nid("a")], st)),
    ("mark_complete", lambda s, st: mark_complete(s, st)),
    ("close", lambda s, st: close(s)),
    ("restart", lambda s, st: restart(s, "other")),
]


@pytest.mark.parametrize("transition", [t[1] for t in TRANSITIONS], ids=[t[0] for t in TRANSITIONS])
def test_transitions_never_mutate_their_input(
    transition: Callable[[RendezvousState, Settings], RendezvousState],
) -> None:
    script = Script(1, 3).join("a", "b")
    before = script.state

    def freeze(s: RendezvousState) -> tuple[object, ...]:
        return (dict(s.participants), s.wait_list, s.redundancy_list, dict(s.nodes), dict(s.applied), s.generation)

    snapshot = freeze(before)
    transition(before, script.settings)
    assert freeze(before) == snapshot


# -- spares when a whole round dies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sweeps", [[("a",), ("b",)], [("a", "b")], [("b", "a")]], ids=["one-by-one", "one-sweep", "one-sweep-reversed"]
)
def test_spares_are_promoted_however_the_participants_die(sweeps: list[tuple[str, ...]]) -> None:
    """Regression: removing every participant of a full round in one sweep used to advance the round with the spares
    left in ``redundancy_list`` of the new incomplete round, where nothing promoted them (they waited forever)."""
    script = Script(2, 2).join("a", "b").join("c")
    for dead in sweeps:
        script.die(*dead)
    assert script.state.round == 1 and not script.state.complete
    assert set(script.state.participants) == {nid("c")}
    assert not script.state.redundancy_list and not script.state.wait_list


# -- exits decided mid-batch ---------------------------------------------------------------------------------------

EXIT_ORDER_REASON = (
    "fold_requests applies a request's exit (torch's exit op) to wherever the node is *during* the batch, after the "
    "requests sorted before it were applied, instead of where it was when it asked (JoinRequest.leave_round is never "
    "read). A round that completes at max_nodes mid-batch then loses a roster member to a later request's exit, or "
    "a waiter moved into a new round by an earlier exit is exited again: the committed round is complete with a "
    "roster (world size) larger than its participants and the missing rank sits in the wait list."
)


def test_participant_asking_again_while_a_newcomer_completes_the_round() -> None:
    # b is the only participant of the incomplete round 0 and asks again (leave_round=0) while a arrives; a sorts
    # first, completes the round at max_nodes=2, then b's exit takes b out of the completed round.
    script = Script(1, 2).join("b").join("a", "b")
    state = script.state
    assert len(state.roster) == len(state.participants), f"roster {state.roster}, participants {state.participants}"
    assert state.participants == {nid("a"): 0, nid("b"): 1} and not state.wait_list


def test_waiter_asking_again_is_not_exited_from_the_round_it_was_just_moved_into() -> None:
    # a is alone in complete round 0, b waits. Both ask again in one batch (b with leave_round=None): a's exit
    # advances to round 1 and moves b in; a re-joins and completes round 1 at max_nodes=2; then b's request is
    # treated as an exit from round 1, which b was never a participant of when it asked.
    script = Script(1, 2).join("a").complete().join("b")
    assert script.state.wait_list == (nid("b"),)
    script.join("a", "b")
    state = script.state
    assert state.round == 1 and state.complete
    assert len(state.roster) == len(state.participants), f"roster {state.roster}, participants {state.participants}"
    assert state.participants == {nid("a"): 0, nid("b"): 1} and not state.wait_list


def test_batch_order_does_not_matter_when_exits_come_first() -> None:
    """The same requests, with the exiting node sorted first, give the torch outcome (exit, then join)."""
    script = Script(1, 2).join("a").join("a", "b")
    assert script.state.participants == {nid("a"): 0, nid("b"): 1} and script.state.roster == (
        NODES["a"].addr,
        NODES["b"].addr,
    )
