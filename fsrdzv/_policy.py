"""The decisions of a join, as pure functions of what one node sees.

No I/O and no clock reads here: the executor (``_join``) builds a frozen :class:`JoinView` from the document it
holds and its own clock readings, :func:`decide` names the next :class:`Action`, and the executor carries it out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from . import _protocol as proto
from ._periods import SLOW_POLL
from ._settings import Settings
from ._state import JoinRequest, RendezvousState

#: Jobs up to this many nodes list the requests to name the creator (in bigger ones, the burst of N listings of
#: several pages each would exceed an object store's request rate per prefix: every node creates, as before).
CREATOR_LISTS_UP_TO: Final = 1024
#: A joiner whose request was not folded folds it itself once the document has not changed for this long (the
#: folder may be stuck; a dead one is removed by the liveness sweep after the liveness timeout).
FOLD_GRACE: Final = 5.0
#: Compare-and-sets one fold tries before it waits for the next poll (each lost one returned the new document).
FOLD_ATTEMPTS: Final = 3
#: How long a node keeps trying to take itself out after its join timed out (torch: 5 s).
ROLLBACK_WINDOW: Final = 5.0


def own_fold_jitter(own_folds: int) -> float:
    """Upper bound of the random pause before a joiner's next fold of its own request (after ``own_folds``)."""
    return min(1.0, 0.02 * 2.0**own_folds)


# -- roles -----------------------------------------------------------------------------------------------------


def waiting(state: RendezvousState) -> list[str]:
    """Members still waiting for a round (everyone but the participants of a complete round)."""
    return [m for m in state.members() if not (state.complete and m in state.participants)]


def anyone_waiting(state: RendezvousState) -> bool:
    """Whether some member waits for a round, and so some member folds requests."""
    return bool(waiting(state))


def folder_of(state: RendezvousState) -> str | None:
    """The node that folds the others' requests: the waiting member whose request was folded first.

    The document keeps the order in which requests were folded, so every node names the same folder, and the
    role stays with one node while others arrive (were it the lowest node identity, each newcomer with a lower one
    would take it over, and learn of it only at its next poll).
    """
    members = set(waiting(state))
    first = next((node_id for node_id in state.applied if node_id in members), None)
    if first is None and members:
        first = min(members, key=lambda i: state.nodes[i])
    return first


def last_call_key(state: RendezvousState) -> tuple[str, int, int] | None:
    """Names the current last-call period (each observer times it from when it first saw this key)."""
    return None if state.last_call is None else (state.epoch, state.round, state.last_call)


# -- the join --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinView:
    """What one joining node knows at one moment: the document, its own request and its clock readings."""

    me: str
    settings: Settings
    request: JoinRequest
    #: The document as last seen (None: there is none yet).
    state: RendezvousState | None
    now: float
    deadline: float
    #: When this node last saw the document change.
    progress_at: float
    #: How often this node folded its own request, and from when it may do so again.
    own_folds: int
    next_own: float
    next_sweep: float
    #: When this node first saw the current last-call mark (None: there is none, or it is not a participant).
    last_call_seen_at: float | None
    #: Whether this node was the folder at its previous poll.
    was_folder: bool

    @property
    def mine(self) -> bool:
        """Whether the document holds this node's current request."""
        return self.state is not None and self.state.applied.get(self.me) == self.request.nonce


@dataclass(frozen=True)
class CreateDocument:
    """No document yet: create it with this node's request folded (a create-if-absent write)."""


@dataclass(frozen=True)
class Rejoin:
    """This node was folded, then removed (others judged it dead while its storage was cut off): ask again, as
    torch's join op re-adds a node the sanitizer dropped."""


@dataclass(frozen=True)
class ReturnInfo:
    """The round is complete with this node as a participant: a fact, even if the run was closed right after."""


@dataclass(frozen=True)
class RaiseClosed:
    """The run is closed; ``spare``: this node waited as a spare (it exits normally)."""

    spare: bool


@dataclass(frozen=True)
class RaiseMismatch:
    """The run was started with another node range or last call (``what`` names both values): leave, then fail."""

    what: str


@dataclass(frozen=True)
class Write:
    """Write ``state``: this node's own fold (``why="fold own"``) or the completion after the last call."""

    state: RendezvousState
    why: Literal["fold own", "complete"]


@dataclass(frozen=True)
class Sweep:
    """List the heartbeats and remove the members that stopped beating."""


@dataclass(frozen=True)
class RollBack:
    """The join timed out: take this node out of the document, then raise the timeout."""


@dataclass(frozen=True)
class Poll:
    """Wait a poll period (``look_now``: not at all, this node just became the folder), then look: the folder
    lists the requests and folds them, every other node reads the document."""

    folder: bool
    look_now: bool


Action = CreateDocument | Rejoin | ReturnInfo | RaiseClosed | RaiseMismatch | Write | Sweep | RollBack | Poll


def create_document(view: JoinView, epoch: str, others: Iterable[JoinRequest] = ()) -> RendezvousState:
    """The first document of a run: this node's request folded into a fresh state, then the requests already
    written (``others``, one listing), so that a burst of arrivals forms with one write. Its own fold comes first:
    it is first in ``applied``, so the folder of what follows, and knows so at once."""
    settings = view.settings
    state = proto.fold_requests(proto.new_state(settings.run_id, epoch), [view.request], settings)
    return proto.fold_requests(state, others, settings)


def lists_first(settings: Settings) -> bool:
    """Whether a fresh node lists the requests before it reads the document (the listing names the creator of a
    missing one; see :func:`creator`)."""
    return settings.max_nodes <= CREATOR_LISTS_UP_TO


def creator(view: JoinView, requests: Iterable[JoinRequest] | None) -> str:
    """Who creates the missing document: the smallest identity among the requests listed (rank 0 of a round it
    completes; its own request counts if not listed), so that the others' creates do not all lose; they wait
    (``Periods.creator_overdue``: it may die). Not listed (None, a big job): every node that finds none."""
    return view.me if requests is None else min([view.request.node, *(r.node for r in requests)]).node_id


def fold_pending(state: RendezvousState, requests: list[JoinRequest], settings: Settings) -> RendezvousState:
    """The folder's write: every pending request folded at once (``state`` itself when none is pending)."""
    return proto.fold_requests(state, requests, settings)


def decide(view: JoinView) -> Action:
    """The next step of a join."""
    state = view.state
    if state is None:
        return CreateDocument()
    return _settled(view, state) or _write_due(view, state) or _housekeeping(view, state)


def _settled(view: JoinView, state: RendezvousState) -> Action | None:
    me = view.me
    mismatch = None if state.closed else proto.config_mismatch(state.config, view.settings)
    if mismatch is not None:
        return RaiseMismatch(mismatch)
    if view.mine and me not in state.members() and not state.closed:
        return Rejoin()
    if view.mine and state.complete and me in state.participants:
        return ReturnInfo()
    if state.closed:
        return RaiseClosed(spare=me in state.redundancy_list)
    return None


def own_fold_due(view: JoinView, state: RendezvousState) -> bool:
    """Whether a joiner folds its own request now. While a round forms, the folder is the only writer (its
    writes then win without a read first), so a joiner folds itself only when nobody folds (the first arrival),
    when the document stood still for ``FOLD_GRACE`` (the folder may be stuck), once when the round is complete
    (a newcomer to its wait list is seen by ``num_nodes_waiting`` at once, not at the folder's slow poll), and
    when its fold completes the round (see :func:`last_missing`); never before its jittered back-off ends.
    """
    folder_at_work = anyone_waiting(state) and view.now - view.progress_at < FOLD_GRACE
    once = view.own_folds == 0 and state.complete
    return view.now >= view.next_own and (not folder_at_work or once or last_missing(view, state))


def last_missing(view: JoinView, state: RendezvousState) -> bool:
    """Whether this node is the one participant a forming round lacks to reach ``max_nodes``: its own fold then
    completes the round without waiting for the folder's next poll, and it holds its rank without a read after
    the write. If the folder folds it meanwhile, one write loses and returns the other's document (one per round)."""
    full = len(state.participants) + 1 >= view.settings.max_nodes
    return full and not (state.complete or state.closed) and view.me not in state.members()


def _write_due(view: JoinView, state: RendezvousState) -> Action | None:
    settings = view.settings
    if not view.mine:
        new = proto.fold_requests(state, [view.request], settings) if own_fold_due(view, state) else state
        return None if new is state else Write(new, "fold own")
    if last_call_expired(view, state):
        new = proto.mark_complete(state, settings)
        return None if new is state else Write(new, "complete")
    return None


def last_call_expired(view: JoinView, state: RendezvousState) -> bool:
    """Whether this participant watched the last-call mark for ``last_call_timeout`` of its own time."""
    seen_at = view.last_call_seen_at
    return (
        view.me in state.participants and seen_at is not None and view.now - seen_at >= view.settings.last_call_timeout
    )


def _housekeeping(view: JoinView, state: RendezvousState) -> Action:
    if view.now >= view.next_sweep:
        return Sweep()
    if view.me not in state.redundancy_list and view.now > view.deadline:
        return RollBack()
    folder = view.mine and folder_of(state) == view.me
    return Poll(folder=folder, look_now=folder and not view.was_folder)


def join_deadline(
    deadline: float, *, was_spare: bool, state: RendezvousState, me: str, now: float, timeout: float
) -> float:
    """The join deadline after this look: torch refreshes it when a node leaves the spare list."""
    return now + timeout if was_spare and me not in state.redundancy_list else deadline


# -- run id reuse ----------------------------------------------------------------------------------------------


def may_reuse(state: RendezvousState | None, me: str) -> bool:
    """Whether a join must first check that a closed run is finished (then it starts afresh)."""
    return state is not None and state.closed and me not in state.members()


def reuse_verdict(gone: set[str], members: set[str], waited: float, settings: Settings) -> str:
    """``"restart"``: every node of the closed run is gone, in every look for a keep-alive interval (a live node
    rewrites its heartbeat within that; one listing alone may miss a record being rewritten); ``"closed"``: one is
    still alive after a full liveness timeout (the run is really closed); ``"wait"``: look again."""
    if gone >= members:
        return "restart" if waited >= settings.keep_alive_interval else "wait"
    if waited > settings.liveness_timeout + settings.keep_alive_interval:
        return "closed"
    return "wait"


def reuse_poll(settings: Settings) -> float:
    return min(SLOW_POLL, settings.keep_alive_interval / 2)
