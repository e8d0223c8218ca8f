"""What the launcher of ``fsrdzv run`` checks while its command runs: does the round it runs in still stand?

Every ``monitor_interval``, one read of the document (nodes waiting, as ``num_nodes_waiting()`` counts them, so that
``scale_up_at=safe_point`` defers them; a new round or epoch; this node dropped; the run closed) and the heartbeat
records of a few peers in a ring (:func:`fsrdzv._peers.ring_peers`): a participant dies when its record stops
changing for ``keep_alive_interval x keep_alive_max_attempt`` seconds of *this* host's monotonic clock, the
handler's rule. A dead peer is removed at once together with its records (:meth:`fsrdzv._admin.RunAdmin.remove_dead`),
so that the next round needs no second wait and its join request is never folded again.
"""

from __future__ import annotations

import contextlib
import logging

from ._errors import RendezvousError, RendezvousStateError
from ._handler import RendezvousHandler, RendezvousInfo
from ._liveness import LivenessTracker
from ._peers import ring_peers
from ._ratelog import log_limited

__all__ = ["RoundCheck", "round_members"]

log = logging.getLogger("fsrdzv.run")


def round_members(handler: RendezvousHandler, info: RendezvousInfo) -> tuple[list[str], str | None]:
    """Node ids of the round's participants in rank order, and the document's epoch."""
    try:
        state = handler.admin.read()
    except RendezvousError as exc:
        log.warning("could not read the round's members (peers are not watched this round): %s", exc)
        return [], None
    if state is None or state.round != info.round:
        return [], None if state is None else state.epoch
    return sorted(state.participants, key=lambda n: state.participants[n]), state.epoch


class RoundCheck:
    """The checks of one round this node runs its command in (made once the round completed)."""

    def __init__(self, handler: RendezvousHandler, info: RendezvousInfo, watch_peers: int) -> None:
        self.handler = handler
        self.info = info
        ids, self.epoch = round_members(handler, info)
        self.peers = ring_peers(ids, handler.node_id, watch_peers)
        self.tracker = LivenessTracker(handler.settings.liveness_timeout)
        #: The run was closed by another node: the command runs to its end, nothing more is checked.
        self.closed_seen = False

    def change(self, now: float) -> str | None:
        """Why the round is over, or None while it still stands.

        :raises StorageError: the document could not be read (the caller keeps the command running).
        """
        handler, info, epoch = self.handler, self.info, self.epoch
        admin = handler.admin
        try:
            state, snap = admin.read_snapshot()
        except RendezvousStateError as exc:
            log_limited(log, logging.ERROR, "the document became unreadable; the command keeps running: %s", exc)
            return None
        if state is None:
            return "the rendezvous document disappeared (fsrdzv reset or gc?)"
        if state.closed:
            self.closed_seen = True
            log.info("run %r was closed by another node: waiting for the command to finish", state.run_id)
            return None
        me = handler.node_id
        if (epoch is not None and state.epoch != epoch) or state.round != info.round or me not in state.participants:
            return f"round {info.round} is over (the document is at round {state.round})"
        waiting = handler.scale_up.waiting(state)
        if waiting:
            return f"{waiting} node(s) waiting to join"
        if not self.peers:
            return None
        self.tracker.observe(admin.heartbeat_tags(self.peers), now, self.peers)
        dead = self.tracker.dead(self.peers, now)
        if not dead:
            return None
        # The handler's own rule, already timed here: remove them with their records at once.
        with contextlib.suppress(RendezvousError):
            admin.remove_dead(state, snap, dead)
        return f"participant(s) {', '.join(sorted(dead))} stopped heartbeating for {self.tracker.timeout:g}s"
