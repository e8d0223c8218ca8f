"""While a round is in use, each node watches a few peers' heartbeats (a ring: O(1) reads per node at any N).

torchrun's agent restarts its workers only when one fails or ``num_nodes_waiting() > 0``; a frozen host (SIGSTOP,
a VM pause, a hung mount) fails nothing, so the survivors would wait inside a collective. With a
:class:`PeerWatch`, ``num_nodes_waiting`` also counts the round's *lost* participants: a watched peer whose
heartbeat stopped changing for the liveness timeout (this node removes it from the document at once, the handler's
own rule), and any participant of this round the document no longer lists (another watcher removed it, or this
node itself was removed while it was frozen: then it re-joins a later round). Each node watches the
``watch_peers`` next ranks, so some live node watches the first of any run of dead nodes; one removal makes every
agent re-rendezvous, after which the joins' own sweeps remove the rest.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Final

from ._admin import RunAdmin
from ._errors import RendezvousError
from ._liveness import LivenessTracker
from ._periods import fresh_credit
from ._settings import Settings
from ._state import RendezvousState

__all__ = ["WATCH_PEERS", "PeerWatch", "ring_peers"]

#: Peers whose heartbeats each node reads while a round is in use (``fsrdzv run --watch-peers``' default).
WATCH_PEERS: Final = 2


def ring_peers(ids: Sequence[str], me: str, watch_peers: int) -> list[str]:
    """The peers whose heartbeats ``me`` watches: the next ``watch_peers`` ranks (0: all); all, if not a member."""
    if me not in ids:
        return [n for n in ids if n != me]
    count = len(ids) - 1 if watch_peers <= 0 else min(watch_peers, len(ids) - 1)
    i = ids.index(me)
    return [ids[(i + k) % len(ids)] for k in range(1, count + 1)]


class PeerWatch:
    """The ring watch of one node over the round it was handed (see the module docstring)."""

    def __init__(
        self, admin: RunAdmin, settings: Settings, me: str, clock: Callable[[], float], watch_peers: int = WATCH_PEERS
    ) -> None:
        self._admin, self._settings, self._me, self._clock = admin, settings, me, clock
        self._watch_peers = watch_peers
        self._round: tuple[str, int] | None = None
        self._members: frozenset[str] = frozenset()
        self._peers: list[str] = []
        self._tracker = self._new_tracker()
        self._next = 0.0
        self._dead: set[str] = set()
        #: This node's round went on without it (it was frozen or cut off): lost until it re-joins.
        self._left_behind = False
        self._rng = random.Random()
        #: The period before jitter: one keep-alive interval (a peer's record changes about that often).
        self.interval = settings.keep_alive_interval

    @property
    def period(self) -> float:
        """Seconds from one look at the peers' records to the next, drawn afresh at each look: one keep-alive
        interval (a peer's record changes about that often), jittered down by up to a fifth so that the watchers'
        looks spread out and never lag a beat; sooner if a peer whose record stopped changing would be due by then,
        so that it is found dead at the liveness timeout after the look that saw its last beat, within one interval
        of that beat."""
        pause = self.interval * self._rng.uniform(0.8, 1.0)
        now = self._clock()
        for peer in self._peers:
            due = None if peer in self._dead else self._tracker.next_death([peer])
            if due is not None and now < due < now + pause:
                pause = due - now
        return pause

    def start(self, state: RendezvousState) -> None:
        """Watch the round of ``state`` (complete, with this node as a participant)."""
        ids = sorted(state.participants, key=lambda n: state.participants[n])
        self._round = (state.epoch, state.round)
        self._members = frozenset(ids)
        self._peers = ring_peers(ids, self._me, self._watch_peers)
        self._tracker = self._new_tracker()
        self._dead = set()
        self._left_behind = False
        self._next = self._clock()

    def _new_tracker(self) -> LivenessTracker:
        # The handler's own rule (a record first seen, or seen changed, counts from the middle of the gap before).
        return LivenessTracker(self._settings.liveness_timeout, fresh_credit=fresh_credit(self._settings))

    def hand_over(self, tracker: LivenessTracker) -> None:
        """Seed the join's ``tracker`` with when this watch last saw each peer's heartbeat change (this node is
        about to re-join): a survivor then times a dead peer from its last heartbeat, as torch's timestamps do,
        not from its join. A live peer still gets two keep-alive intervals of silence, or the timeout if shorter
        (see ``LivenessTracker.seed``)."""
        if self._round is None:
            return
        settings = self._settings
        floor = max(settings.liveness_timeout - 2 * settings.keep_alive_interval, fresh_credit(settings))
        tracker.seed(self._tracker.changes(self._peers), floor)

    def stop(self) -> None:
        self._round = None
        self._left_behind = False

    def lost(self, state: RendezvousState | None) -> int:
        """How many participants this node's round has lost (0 when no round is watched).

        A round that is over while this node still runs in it (the others re-formed while it was frozen or cut
        off) counts this node as lost: its agent must re-rendezvous, to join a later round or to learn that the run
        closed without it. A run closed in this node's round is the normal end of a job: nothing is lost.
        """
        if self._round is None or state is None:
            return 0
        if self._left_behind:
            return 1
        if (state.epoch, state.round) != self._round:
            return self._over(state)
        if state.closed:
            return 0
        now = self._clock()
        if now >= self._next:
            self._next = now + self.period
            fresh = self._look(state, now)
            if fresh is not None and (fresh.closed or (fresh.epoch, fresh.round) != self._round):
                # The document as it is now (read to remove the peers) says the round is over: a peer whose
                # heartbeat stopped had shut down cleanly and closed the run, or the round re-formed.
                return self._over(fresh)
            state = fresh or state
        gone = self._members - set(state.participants)
        return len(gone | self._dead)

    def _over(self, state: RendezvousState) -> int:
        """This node's round is over in ``state``; the node is lost to it unless the run closed with it inside."""
        if state.closed and self._me in state.participants:
            self.stop()
            return 0
        self._left_behind = True  # until this node re-joins (start/stop), whatever older read it is asked about
        return 1

    def _look(self, state: RendezvousState, now: float) -> RendezvousState | None:
        """Look at the peers' heartbeat tags (no bodies but on a signed store); remove those found dead and return
        the document after that (None: no one died, or the storage failed)."""
        peers = [p for p in self._peers if p in state.participants and p not in self._dead]
        if not peers:
            return None
        try:
            self._tracker.observe(self._admin.heartbeat_tags(peers), now, peers)
            dead = self._tracker.dead(peers, now)
            if not dead:
                return None
            # Remove them now (already timed here), so that the next round needs no second wait for them.
            fresh = self._admin.remove_nodes(dead)
            if fresh is not None and fresh.closed:
                return fresh  # the run closed (a peer shut down cleanly): nothing is lost, its nodes leave
            self._dead |= dead
            self._admin.forget_records(dead)
            return fresh
        except RendezvousError:
            return None  # the storage failed: look again next period (the agent keeps training meanwhile)
