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

from collections.abc import Callable, Sequence
from typing import Final

from ._admin import RunAdmin
from ._errors import RendezvousError
from ._liveness import LivenessTracker
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
        self._tracker = LivenessTracker(settings.liveness_timeout)
        self._next = 0.0
        self._dead: set[str] = set()
        #: Reads between two looks at the peers' records (s): the liveness timeout is met within this.
        self.period = min(1.0, settings.keep_alive_interval / 2)

    def start(self, state: RendezvousState) -> None:
        """Watch the round of ``state`` (complete, with this node as a participant)."""
        ids = sorted(state.participants, key=lambda n: state.participants[n])
        self._round = (state.epoch, state.round)
        self._members = frozenset(ids)
        self._peers = ring_peers(ids, self._me, self._watch_peers)
        self._tracker = LivenessTracker(self._settings.liveness_timeout)
        self._dead = set()
        self._next = self._clock()

    def stop(self) -> None:
        self._round = None

    def lost(self, state: RendezvousState | None) -> int:
        """How many participants this node's round has lost (0 when no round is watched or it is over)."""
        if not self._watching(state):
            return 0
        assert state is not None
        now = self._clock()
        if now >= self._next:
            self._next = now + self.period
            fresh = self._look(state, now)
            if fresh is not None:
                state = fresh
                if not self._watching(state):
                    # The document as it is now (read to remove the peers) says the round is over: a peer whose
                    # heartbeat stopped had shut down cleanly, closing the run. Nothing is lost: stop watching.
                    self.stop()
                    return 0
        gone = self._members - set(state.participants)
        return len(gone | self._dead)

    def _watching(self, state: RendezvousState | None) -> bool:
        return not (self._round is None or state is None or (state.epoch, state.round) != self._round or state.closed)

    def _look(self, state: RendezvousState, now: float) -> RendezvousState | None:
        """Read the peers' heartbeats; remove those found dead and return the document after that (None: no
        one died, or the storage failed)."""
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
                return fresh  # a closed run is left as it is: its nodes leave, nobody is removed
            self._dead |= dead
            self._admin.forget_records(dead)
            return fresh
        except RendezvousError:
            return None  # the storage failed: look again next period (the agent keeps training meanwhile)
