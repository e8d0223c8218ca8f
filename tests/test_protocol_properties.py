"""Property-based tests of the protocol's invariants: a hypothesis state machine drives the pure transitions.

The machine plays a pool of nodes against one document the way handlers do: nodes write join requests (their
own records), whoever commits folds some or all of the records it lists (listings may lag), liveness removes dead
nodes, a participant completes the round after its last call, the run is closed, and a finished run is restarted.
After every step it checks the invariants of the document and of the transition:

* a node is in at most one list, every listed node has an identity, ``len(participants) <= max_nodes``;
* an incomplete round has no waiting nodes and no spares, ranks 0, no master, and a last-call mark exactly when it
  has at least ``min_nodes`` participants;
* a round that completes gets dense ranks 0..n-1 in sorted identity order, a roster listing exactly those
  participants, and rank 0's address as master; ranks stay unique and inside the roster afterwards;
* closed stays closed (until restart); the generation never decreases and grows by exactly one on every change
  (restart keeps it and changes the epoch); the round grows by at most one per step, only from a complete round;
* every folded request's node is a member afterwards, and the document survives a JSON round trip unchanged.

``ProtocolMachine`` models well-behaved handlers: a node asks again only once its previous request was folded and
it is either not a member or a participant of a complete round (a handler asks again when its agent restarts
after a formation, or after it was dropped). ``AnyRequestMachine`` lets any node ask at any time (a handler that
gave up on a join and retried, for example); it finds a defect, see ``test_any_request_order``.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fsrdzv._protocol import close, fold_requests, mark_complete, new_state, pending, remove_nodes, restart
from fsrdzv._settings import Settings
from fsrdzv._state import JoinRequest, NodeInfo, RendezvousState, decode_state, encode_state

RUN = "prop-run"

# Identities chosen to exercise every tie-break of the rank order: addr as a string (node10 < node2), then pid as a
# number (9 < 10), then local id, then nonce.
POOL: tuple[NodeInfo, ...] = (
    NodeInfo("node2", 10, 0, "n0", port=29500, host="h0"),
    NodeInfo("node10", 10, 0, "n1", port=29501, host="h1"),
    NodeInfo("node1", 10, 0, "n2", port=29502, host="h2"),
    NodeInfo("node1", 9, 0, "n3", port=29503, host="h3"),
    NodeInfo("node1", 9, 1, "n4", port=29504, host="h4"),
    NodeInfo("node1", 9, 1, "n3", port=29505, host="h5"),
)
IDS = tuple(n.node_id for n in POOL)
assert len(set(IDS)) == len(IDS)

picks = st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=len(POOL), unique=True)


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.settings = Settings(run_id=RUN, min_nodes=1, max_nodes=1)
        self.state = new_state(RUN, "epoch-0")
        #: The req records in the store: node id -> that node's newest request.
        self.records: dict[str, JoinRequest] = {}
        self.counter = 0

    # -- model of the handlers -----------------------------------------------------------------------------------

    def may_ask(self, node_id: str) -> bool:
        state = self.state
        record = self.records.get(node_id)
        if record is not None and state.applied.get(node_id) != record.nonce and not state.closed:
            return False  # its previous request is still pending: its handler is still waiting for it
        return node_id not in state.members() or (state.complete and node_id in state.participants)

    def ask(self, indexes: list[int]) -> None:
        for i in indexes:
            node = POOL[i]
            if not self.may_ask(node.node_id):
                continue
            self.counter += 1
            leave = self.state.round if node.node_id in self.state.participants else None
            self.records[node.node_id] = JoinRequest(node, f"q{self.counter}", leave)

    # -- rules ---------------------------------------------------------------------------------------------------

    @initialize(min_nodes=st.integers(1, 3), extra=st.integers(0, 3))
    def configure(self, min_nodes: int, extra: int) -> None:
        self.settings = Settings(run_id=RUN, min_nodes=min_nodes, max_nodes=min_nodes + extra)

    @rule(indexes=picks)
    def write_requests(self, indexes: list[int]) -> None:
        self.ask(indexes)

    @rule(indexes=picks)
    def join(self, indexes: list[int]) -> None:
        """The common path: nodes write requests and one of them folds everything it lists."""
        self.ask(indexes)
        self.fold(list(self.records.values()))

    @rule(visible=st.sets(st.integers(0, len(POOL) - 1)), duplicate=st.booleans(), reverse=st.booleans())
    def fold_listing(self, visible: set[int], duplicate: bool, reverse: bool) -> None:
        """Fold what a (possibly lagging) listing shows, maybe with the folder's own request given twice."""
        batch = [self.records[IDS[i]] for i in sorted(visible) if IDS[i] in self.records]
        if duplicate:
            batch = batch + batch[:1]
        if reverse:
            batch.reverse()
        self.fold(batch)

    @rule(indexes=picks)
    def die(self, indexes: list[int]) -> None:
        dead = {IDS[i] for i in indexes}
        before = self.state
        after = remove_nodes(before, dead, self.settings)
        self.check_transition(before, after)
        assert not dead & after.members()
        if not dead & before.members():
            assert after is before
        elif before.complete and after.round == before.round:
            assert set(before.participants) - set(after.participants) <= dead
        self.state = after

    @rule()
    def last_call_expired(self) -> None:
        before = self.state
        after = mark_complete(before, self.settings)
        self.check_transition(before, after)
        can = not before.complete and not before.closed
        can = can and self.settings.min_nodes <= len(before.participants) <= self.settings.max_nodes
        assert (after is not before) == can
        self.state = after

    @rule()
    def set_closed(self) -> None:
        before = self.state
        after = close(before)
        self.check_transition(before, after)
        assert after.closed and (after is before) == before.closed
        self.state = after

    @precondition(lambda self: self.state.closed)
    @rule()
    def reuse_run_id(self) -> None:
        before = self.state
        self.counter += 1
        after = restart(before, f"epoch-{self.counter}")
        assert after.epoch != before.epoch and after.generation == before.generation + 1
        assert not after.closed and not after.members() and after.round == 0
        assert after.applied == before.applied  # old request records stay folded: never re-admitted
        self.records.clear()
        self.state = after

    # -- checks --------------------------------------------------------------------------------------------------

    def fold(self, batch: list[JoinRequest]) -> None:
        before = self.state
        todo = pending(before, batch)
        after = fold_requests(before, batch, self.settings)
        self.check_transition(before, after)
        if before.closed or not todo:
            assert after is before
        else:
            assert after.generation == before.generation + 1
            newest = {r.node.node_id: r.nonce for r in todo}
            for node_id, nonce in newest.items():
                assert node_id in after.members(), f"{node_id} asked to join but is in no list"
                assert after.applied[node_id] == nonce
        self.state = after

    def check_transition(self, before: RendezvousState, after: RendezvousState) -> None:
        assert after.run_id == before.run_id and after.epoch == before.epoch
        if before.closed:
            assert after.closed, "a closed run reopened"
        if after == before:
            assert after.generation == before.generation
        else:
            assert after.generation == before.generation + 1, "a change must bump the generation exactly once"
        assert after.round in (before.round, before.round + 1), "the round advanced twice in one step"
        if after.round == before.round + 1:
            assert before.complete, "only a complete round that lost all its participants advances"
        completed_now = after.complete and (not before.complete or after.round != before.round)
        if after.round != before.round:
            event("round advanced")
        if set(before.redundancy_list) - set(after.redundancy_list) & after.members():
            event("spare moved")
        if completed_now:
            event(f"completed with {len(after.participants)} of max {self.settings.max_nodes}")
            order = sorted(after.participants, key=lambda i: after.nodes[i])
            assert [after.participants[i] for i in order] == list(range(len(order))), "ranks not dense/sorted"
            assert after.roster == tuple(after.nodes[i].addr for i in order), "roster is not the participants"
            first = after.nodes[order[0]]
            assert after.master == (first.addr, first.port)

    @invariant()
    def document_is_consistent(self) -> None:
        state, settings_ = self.state, self.settings
        listed = [*state.participants, *state.wait_list, *state.redundancy_list]
        duplicates = [k for k, v in Counter(listed).items() if v > 1]
        assert not duplicates, f"in more than one list: {duplicates}"
        assert set(listed) == set(state.nodes), "identities do not match the lists"
        assert set(listed) <= set(state.applied)
        assert len(state.participants) <= settings_.max_nodes
        assert state.last_call is None or state.last_call <= state.generation
        if state.complete:
            assert state.last_call is None and state.master is not None
            ranks = list(state.participants.values())
            assert len(set(ranks)) == len(ranks), "duplicate ranks"
            for node_id, rank in state.participants.items():
                assert 0 <= rank < len(state.roster) and state.roster[rank] == state.nodes[node_id].addr
        else:
            assert set(state.participants.values()) <= {0}
            assert state.master is None and state.roster == ()
        if state.closed:
            # Deaths are still removed from a closed run, but nobody is moved between lists any more: every node
            # of a closed run stops (ClosedError, or GracefulExit for spares), so the lists are only a record.
            return
        if state.complete:
            if state.redundancy_list:
                assert len(state.participants) == settings_.max_nodes, "spares while the round has room"
            if state.wait_list:
                assert len(state.participants) < settings_.max_nodes
        else:
            assert not state.wait_list, "waiting nodes in an incomplete round"
            assert not state.redundancy_list, "spares in an incomplete round"
            assert (state.last_call is not None) == (len(state.participants) >= settings_.min_nodes)

    @invariant()
    def json_round_trip(self) -> None:
        data = encode_state(self.state)
        decoded = decode_state(data, "the test document")
        # The lists are sets: the document stores them sorted, the in-memory tuples keep insertion order.
        assert decoded == self.state.evolve(
            wait_list=tuple(sorted(self.state.wait_list)), redundancy_list=tuple(sorted(self.state.redundancy_list))
        )
        assert encode_state(decoded) == data


class AnyRequestMachine(ProtocolMachine):
    """Any node may ask again at any time, even while an earlier request of its own is still waiting."""

    def may_ask(self, node_id: str) -> bool:
        return True


FAST = settings(
    max_examples=250,
    stateful_step_count=30,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

TestProtocolMachine = ProtocolMachine.TestCase
TestProtocolMachine.settings = FAST


def test_any_request_order() -> None:
    """Any node may ask again at any time, in any batch: leaves are decided before joins, on the pre-batch state."""
    run_state_machine_as_test(
        AnyRequestMachine,
        settings=settings(FAST, max_examples=200, phases=[Phase.explicit, Phase.reuse, Phase.generate]),
    )
