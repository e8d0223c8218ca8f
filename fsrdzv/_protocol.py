"""Pure protocol transitions: ``(state, inputs, settings) -> new state``. No I/O, no clock reads.

The rules are torch's dynamic rendezvous (join op §7.4, exit op §7.3, sanitizer §6 of the reference), applied
to *batches*: whoever commits the document folds every pending join request in one compare-and-set, so forming
N nodes costs O(N) writes instead of N contended CASes of one object.

Deliberate differences from torch 2.13, each for a reason:

* When a round advances, the waiting nodes are moved into the new round in the same write (torch lets each do
  it on its own next sync: N more CASes). Nodes beyond ``max_nodes`` go to the redundancy list instead of
  staying in the wait list forever (which would make ``num_nodes_waiting`` stay positive and agents restart in
  a loop).
* When a complete round loses a participant, spares are promoted to the wait list in the same write.
* The last-call period is a generation mark, timed by each observer on its own monotonic clock.
* The master address and port of rank 0 are recorded for every completed round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ._settings import Settings
from ._state import APPLIED_HISTORY, JoinRequest, NodeInfo, RendezvousState, nonce_order

__all__ = [
    "SHARED_SETTINGS",
    "close",
    "complete_round",
    "config_mismatch",
    "fold_requests",
    "mark_complete",
    "new_state",
    "pending",
    "remove_nodes",
    "restart",
    "run_config",
    "stamp_lead",
]


def new_state(run_id: str, epoch: str, generation: int = 0) -> RendezvousState:
    return RendezvousState(run_id=run_id, epoch=epoch, generation=generation)


def restart(state: RendezvousState, epoch: str) -> RendezvousState:
    """A fresh incarnation of a finished run (run id reuse).

    No member, round or closed flag of the old job survives. The generation keeps climbing and ``applied`` is
    kept, so a request record left behind by a killed node of the old job can never be folded into the new one.
    """
    return new_state(state.run_id, epoch, state.generation + 1).evolve(applied=dict(state.applied))


def pending(state: RendezvousState, requests: Iterable[JoinRequest]) -> list[JoinRequest]:
    """Requests not yet folded into ``state``: not the applied one, and not older than it.

    A node's nonces are ordered when the handler made them (:func:`nonce_order`): a listing that still shows a
    node's previous request (NFS caches directory listings) must never fold it again after the newer one.
    """
    out = []
    for request in requests:
        applied = state.applied.get(request.node.node_id)
        orders = None if applied is None else _orders(request.nonce, applied)
        if applied != request.nonce and not (orders and orders[0] <= orders[1]):
            out.append(request)
    return out


def _orders(nonce: str, other: str) -> tuple[int, int] | None:
    """The sequence numbers of two nonces of one node, when both are ordered (see :func:`nonce_order`)."""
    a, b = nonce_order(nonce), nonce_order(other)
    return None if a is None or b is None else (a, b)


def _ordered(state: RendezvousState, ids: Iterable[str]) -> list[str]:
    return sorted(ids, key=lambda i: state.nodes[i])


def complete_round(state: RendezvousState) -> RendezvousState:
    """The round completed: ranks by sorted node identity; the master is rank 0's address and port. The caller
    bumps the generation (a fold that reaches ``max_nodes``, or :func:`mark_complete`)."""
    order = _ordered(state, state.participants)
    ranks = {node_id: rank for rank, node_id in enumerate(order)}
    first = state.nodes[order[0]]
    roster = tuple(state.nodes[n].addr for n in order)
    return state.evolve(
        complete=True, last_call=None, participants=ranks, master=(first.addr, first.port), roster=roster
    )


def stamp_lead(state: RendezvousState, lead: Mapping[str, object] | None) -> RendezvousState:
    """``state`` naming ``lead`` (a node's id, under ``"node"``, and its heartbeat fields) when that node is rank 0
    of the round, or would be if it completed now (the smallest identity among the participants): the writes of
    rank 0 carry its address candidates to the others. A round's creator is its smallest identity, so a burst of
    arrivals forms with them in its first document; a smaller node that joins later makes its own writes name it."""
    if lead is None or state.lead == lead or not state.participants:
        return state
    node = lead.get("node")
    if not isinstance(node, str) or node not in state.participants:
        return state
    if state.complete:
        first = state.participants[node] == 0
    else:  # the rank it would get: complete_round ranks by sorted identity
        first = min(state.participants, key=lambda i: state.nodes[i]) == node
    return state.evolve(lead=dict(lead)) if first else state


def _with_last_call(state: RendezvousState, settings: Settings, generation: int) -> RendezvousState:
    count = len(state.participants)
    if state.complete:
        return state
    if count >= settings.max_nodes:
        return complete_round(state)
    if count >= settings.min_nodes:
        return state if state.last_call is not None else state.evolve(last_call=generation)
    return state.evolve(last_call=None)


def _advance_round(state: RendezvousState, settings: Settings, generation: int) -> RendezvousState:
    """The last participant of a complete round left: start the next round with the waiting nodes."""
    state = state.evolve(
        round=state.round + 1, complete=False, last_call=None, master=None, lead=None, roster=(), participants={}
    )
    return _settle(state, settings, generation)


def _settle(state: RendezvousState, settings: Settings, generation: int) -> RendezvousState:
    """Move nodes that already asked to join to where torch's join rules would put them on their next sync.

    In an incomplete round, waiting nodes and then spares become participants (up to ``max_nodes``; any beyond
    it become spares rather than waiting forever). In a complete round that lost participants, spares move to
    the wait list so that every agent sees a waiting node and re-rendezvouses.
    """
    if state.closed:
        return state
    if not state.complete:
        room = settings.max_nodes - len(state.participants)
        candidates = _ordered(state, state.wait_list) + _ordered(state, state.redundancy_list)
        if candidates and room > 0:
            joining, extra = candidates[:room], candidates[room:]
            state = state.evolve(
                participants={**state.participants, **dict.fromkeys(joining, 0)},
                wait_list=(),
                redundancy_list=tuple(sorted(extra)),
            )
        state = _with_last_call(state, settings, generation)
        if state.complete and state.wait_list:
            state = state.evolve(
                redundancy_list=tuple(sorted({*state.redundancy_list, *state.wait_list})), wait_list=()
            )
        return state
    if state.redundancy_list and len(state.participants) < settings.max_nodes:
        # A spare replaces a lost node: as a waiting node it makes every agent re-rendezvous.
        return state.evolve(wait_list=tuple(sorted({*state.wait_list, *state.redundancy_list})), redundancy_list=())
    return state


def _after_participant_loss(state: RendezvousState, settings: Settings, generation: int) -> RendezvousState:
    if state.complete and not state.participants:
        return _advance_round(state, settings, generation)
    return _settle(state, settings, generation)


def _drop(state: RendezvousState, node_id: str) -> RendezvousState:
    participants = {k: v for k, v in state.participants.items() if k != node_id}
    nodes = {k: v for k, v in state.nodes.items() if k != node_id}
    return state.evolve(
        participants=participants,
        wait_list=tuple(x for x in state.wait_list if x != node_id),
        redundancy_list=tuple(x for x in state.redundancy_list if x != node_id),
        nodes=nodes,
    )


def _trim_applied(state: RendezvousState, history: int = APPLIED_HISTORY) -> RendezvousState:
    members = state.members()
    gone = [k for k in state.applied if k not in members]
    if len(gone) <= history:
        return state
    drop = set(gone[: len(gone) - history])
    return state.evolve(applied={k: v for k, v in state.applied.items() if k not in drop})


def _join_one(state: RendezvousState, node: NodeInfo, settings: Settings, generation: int) -> RendezvousState:
    node_id = node.node_id
    nodes = {**state.nodes, node_id: node}
    if node_id in state.redundancy_list and len(state.participants) < settings.max_nodes:
        state = state.evolve(redundancy_list=tuple(x for x in state.redundancy_list if x != node_id))
    if node_id in state.participants or node_id in state.redundancy_list:
        return state.evolve(nodes=nodes)
    if state.complete:
        if len(state.participants) < settings.max_nodes:
            if node_id in state.wait_list:
                return state.evolve(nodes=nodes)
            return state.evolve(nodes=nodes, wait_list=(*state.wait_list, node_id))
        wait = tuple(x for x in state.wait_list if x != node_id)
        return state.evolve(nodes=nodes, wait_list=wait, redundancy_list=(*state.redundancy_list, node_id))
    # An incomplete round: become a participant (leaving the wait list if there).
    if len(state.participants) >= settings.max_nodes:  # pragma: no cover - max completes the round at once
        return state.evolve(nodes=nodes, redundancy_list=(*state.redundancy_list, node_id))
    state = state.evolve(
        nodes=nodes,
        participants={**state.participants, node_id: 0},
        wait_list=tuple(x for x in state.wait_list if x != node_id),
    )
    return _with_last_call(state, settings, generation)


def fold_requests(state: RendezvousState, requests: Iterable[JoinRequest], settings: Settings) -> RendezvousState:
    """Apply every pending join request (sorted by node identity) and bump the generation once.

    A request first takes its node out of the round it was a participant of (torch's exit op), then joins it by
    torch's join rules. Requests already applied (same nonce) are skipped, so folding is idempotent. Requests
    on a closed run are left alone: their nodes will see ``closed`` and stop.
    """
    # One request per node: the newest by nonce order when known, else the last one given.
    latest: dict[str, JoinRequest] = {}
    for r in pending(state, requests):
        seen = latest.get(r.node.node_id)
        orders = None if seen is None else _orders(r.nonce, seen.nonce)
        if not (orders and orders[0] < orders[1]):
            latest[r.node.node_id] = r
    todo = sorted(latest.values(), key=lambda r: r.node)
    if state.closed or not todo:
        return state
    generation = state.generation + 1
    applied = dict(state.applied)
    # Leaves first, decided on the state before the batch (torch's exit op), then joins: a node's position
    # must not depend on which other requests happen to share its batch.
    leaving = [r.node.node_id for r in todo if r.node.node_id in state.participants]
    for node_id in leaving:
        state = _drop(state, node_id)
        state = _after_participant_loss(state, settings, generation)
    for request in todo:
        node_id = request.node.node_id
        state = _join_one(state, request.node, settings, generation)
        applied.pop(node_id, None)  # re-insert so that the dict keeps application order (oldest first)
        applied[node_id] = request.nonce
    state = _settle(state, settings, generation)
    if state.config is None:
        state = state.evolve(config=run_config(settings))
    return _trim_applied(state.evolve(applied=applied, generation=generation), settings.applied_history)


def remove_nodes(state: RendezvousState, node_ids: Iterable[str], settings: Settings) -> RendezvousState:
    """Remove dead (or timed-out) nodes from every list, with torch's participant epilogue."""
    doomed = [n for n in node_ids if n in state.members()]
    if not doomed:
        return state
    generation = state.generation + 1
    lost_participant = False
    for node_id in doomed:
        lost_participant |= node_id in state.participants
        state = _drop(state, node_id)
    if lost_participant:
        state = _after_participant_loss(state, settings, generation)
    return _trim_applied(state.evolve(generation=generation), settings.applied_history)


def run_config(settings: Settings) -> dict[str, object]:
    """What the document records of the run's settings (see ``RendezvousState.config``)."""
    config: dict[str, object] = {
        "min_nodes": settings.min_nodes,
        "max_nodes": settings.max_nodes,
        # Milliseconds: the document holds no floats (no value that looks like a time stamp).
        "last_call_ms": round(settings.last_call_timeout * 1000),
        "join_ms": round(settings.join_timeout * 1000),
        "keep_alive_ms": round(settings.keep_alive_interval * 1000),
        "keep_alive_max_attempt": settings.keep_alive_max_attempt,
    }
    if settings.expected_nodes:
        config["expected_nodes"] = list(settings.expected_nodes)
    return config


def recorded_liveness_timeout(config: object) -> float:
    """The liveness timeout a document's ``config`` (:func:`run_config`) records; 0 when it records none (an older
    fsrdzv wrote the document) or a value that is not a positive count."""
    if not isinstance(config, dict):
        return 0.0
    interval, attempts = config.get("keep_alive_ms"), config.get("keep_alive_max_attempt")
    if type(interval) is int and type(attempts) is int and interval > 0 and attempts > 0:
        return interval / 1000 * attempts
    return 0.0


#: The settings every node of a run must share: a difference fails the newcomer at once.
SHARED_SETTINGS = {"min_nodes": "min_nodes", "max_nodes": "max_nodes", "last_call_ms": "last_call_timeout"}


def config_mismatch(config: object, settings: Settings) -> str | None:
    """``"min_nodes: this node 3, the run 2"`` for the first shared setting that differs, else None."""
    if not isinstance(config, dict):
        return None
    mine = run_config(settings)
    for key, name in SHARED_SETTINGS.items():
        theirs, ours = config.get(key), mine[key]
        if isinstance(theirs, int) and isinstance(ours, int) and theirs != ours:
            if key.endswith("_ms"):
                return f"{name}={ours / 1000:g}s on this node, {name}={theirs / 1000:g}s in the run"
            return f"{name}={ours} on this node, {name}={theirs} in the run"
    return None


def close(state: RendezvousState) -> RendezvousState:
    if state.closed:
        return state
    return state.evolve(closed=True, generation=state.generation + 1)


def mark_complete(state: RendezvousState, settings: Settings) -> RendezvousState:
    """Complete the round after its last call expired (a participant's local timer decides when)."""
    if state.complete or state.closed or not (settings.min_nodes <= len(state.participants) <= settings.max_nodes):
        return state
    return complete_round(state).evolve(generation=state.generation + 1)
