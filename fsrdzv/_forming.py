"""The writes of a round that forms: the creation of a missing document and the folder's folds.

:class:`Former` carries them out for one node's :class:`~fsrdzv._join.Joiner`, through its
:class:`~fsrdzv._session.Session`; what to write is decided by ``_policy``. :class:`JoinProgress` is what one join
carries from one look to the next (the executor and these writes share it).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from . import _policy as policy
from ._periods import Periods
from ._records import RequestBook
from ._retry import Attempts
from ._session import Session
from ._settings import Settings
from ._state import JoinRequest, RendezvousState
from ._store import Snapshot

__all__ = ["Former", "JoinProgress"]


@dataclass
class JoinProgress:
    """What one join carries from one look to the next."""

    request: JoinRequest
    state: RendezvousState | None
    snap: Snapshot | None
    deadline: float
    attempts: Attempts
    poll: float
    next_own: float
    next_sweep: float
    progress_at: float
    looked_at: float
    own_folds: int = 0
    seen: tuple[str, int] | None = None
    was_spare: bool = False
    was_folder: bool = False
    #: When this join, finding no document, left its creation to a node with a smaller identity.
    deferred_at: float | None = None
    #: Whether the first document this join saw was checked for a finished run to start afresh.
    reuse_checked: bool = False


class Former:
    """One node's writes while a round forms: it creates a missing document, or folds the pending requests as the
    round's folder."""

    def __init__(
        self,
        session: Session,
        book: RequestBook,
        periods: Periods,
        settings: Settings,
    ) -> None:
        self.session = session
        self.book = book
        self.periods = periods
        self.settings = settings

    def create(self, run: JoinProgress, view: policy.JoinView) -> None:
        """No document yet: the node with the smallest identity among the requests creates it with all of them
        folded (a burst of arrivals forms with one write); the others look again about a round trip later (and
        create it themselves once the creator is overdue). A create that loses returns the winner's document."""
        session, periods = self.session, self.periods
        now = session.clock()
        requests: list[JoinRequest] | None = None
        if run.deferred_at is None:
            if policy.lists_first(view.settings):
                requests = self.book.pending_looking()
            creator = policy.creator(view, requests)
            if creator != view.me:
                run.deferred_at = now
                wait = periods.creator_wait(session.read_latency)
                self._look_again(run, max(0.0, now + wait - session.clock()))
                return
        elif periods.creator_overdue(now - run.deferred_at):
            requests = self.book.pending_looking()
        else:  # looked too early (the creator is slower than this node): again about its write's round trip later
            self._look_again(run, periods.creator_wait(session.read_latency))
            return
        document = policy.create_document(view, secrets.token_hex(8), requests or ())
        _, run.state, run.snap = session.cas(document, None)
        run.own_folds += 1

    def _look_again(self, run: JoinProgress, wait: float) -> None:
        self.session.wait(wait, "waiter")
        run.state, run.snap = self.session.read()
        run.looked_at = self.session.clock()

    def fold_pending(self, run: JoinProgress) -> None:
        """The folder folds every pending request into the document as it last saw it.

        While a round forms it is the only writer, so the write wins without a read first; it reads the document
        only when it has not seen it for a few polls (a read at every wake-up would spend its read budget while
        nodes arrive in a burst). A lost write brings the current document: the fold is made again on it at once
        (a few times at most; the next poll tries again).
        """
        session = self.session
        requests = self.book.pending_looking()
        if self.periods.folder_read_due(run.looked_at, session.clock()):
            run.state, run.snap = session.read()
            run.looked_at = session.clock()
        state, snap = run.state, run.snap
        if state is None or snap is None:
            return
        for _ in range(policy.FOLD_ATTEMPTS):
            new = policy.fold_pending(state, requests, self.settings)
            if new is state:
                break
            won, got, got_snap = session.cas(new, snap)
            run.looked_at = session.clock()  # a write, won or lost, brought the current document
            if won or got is None or got_snap is None:
                state, snap = got, got_snap
                break
            state, snap = got, got_snap
        run.state, run.snap = state, snap
