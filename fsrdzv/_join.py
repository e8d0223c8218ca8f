"""The executor of a join: build a view, let the policy decide, carry the action out; repeat.

All I/O of a join happens here (the writes of a forming round in ``_forming``), through the node's
:class:`~fsrdzv._session.Session` and :class:`~fsrdzv._admin.RunAdmin`; every decision is made by ``_policy``
from a frozen :class:`~fsrdzv._policy.JoinView`. The loop-carried facts of one join (its request, the document
as last seen, its clock readings) live in :class:`~fsrdzv._forming.JoinProgress`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import NoReturn

from . import _policy as policy
from ._admin import RunAdmin
from ._errors import (
    ConfigurationError,
    RendezvousClosedError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
    StorageError,
)
from ._forming import Former, JoinProgress
from ._keepalive import Heartbeat
from ._periods import Periods
from ._progress import ProgressReport
from ._records import BeatFilter, RequestBook
from ._retry import Retry
from ._session import Session
from ._settings import Settings
from ._state import JoinRequest, NodeInfo, RendezvousState
from ._store import Snapshot

__all__ = ["Joiner"]

log = logging.getLogger("fsrdzv")


class Joiner:
    """One node's joins, in the order the policy names the steps (see :func:`fsrdzv._policy.decide`)."""

    def __init__(
        self,
        *,
        settings: Settings,
        session: Session,
        admin: RunAdmin,
        heartbeat: Heartbeat,
        node: NodeInfo,
        rng: random.Random,
        retry: Retry,
        port_factory: Callable[[str], int],
    ) -> None:
        self.settings = settings
        self.session = session
        self.admin = admin
        self.heartbeat = heartbeat
        self.node = node
        self.periods = Periods.of(settings)
        self.requests = RequestBook(session)
        self.beats = BeatFilter(session)
        self.liveness = self.periods.tracker(settings)
        self._rng = rng
        self._retry = retry
        self._port_factory = port_factory
        self._clock = session.clock
        self._request_count = 0
        self._last_call_seen: dict[tuple[str, int, int], float] = {}
        self._verified = False
        #: Epochs this node was handed a round of: a closed run of one of them is this job's end, never a finished
        #: run to start afresh (a node thawed after the others finished must stop, not restart the run id).
        self._epochs: set[str] = set()
        self.progress = ProgressReport(settings, node.node_id)
        self.former = Former(session, self.requests, self.periods, settings)

    @property
    def me(self) -> str:
        return self.node.node_id

    # -- before the loop -----------------------------------------------------------------------------------

    def join(self) -> RendezvousState:
        """Join the next round; the document of the completed round that has this node as a participant."""
        start = self._clock()
        deadline = start + self.settings.join_timeout
        self.progress.start(start)
        if not self._verified:
            self._retry(self.session.store.verify_conditions, deadline)
            self._verified = True
        # The first beat goes out from the keep-alive while this node reads and asks to join (one round trip
        # less before its request is visible); a rejoin beats at once, as before.
        self._retry(lambda: self.heartbeat.start(now=False), deadline)
        # Watch before asking to join: a completion announced while this node folds or reads must still wake it.
        self.session.watch("waiter")
        request: JoinRequest | None = None
        if self._request_count == 0:
            # This node (a fresh identity) was never a participant: it asks before it reads, so that the folder
            # can see the request one round trip sooner.
            request = self._ask(None, deadline)
        # A fresh node's first look is the listing that names the creator of a missing document (Former.create):
        # while a job forms, no node reads a missing document, and a create that loses brings the document.
        lists_first = request is not None and policy.lists_first(self.settings)
        state, snap = (None, None) if lists_first else self._retry(self.session.read, deadline)
        if request is None:
            leave_round = state.round if state is not None and self.me in state.participants else None
            request = self._ask(leave_round, deadline)
        run = JoinProgress(
            request=request,
            state=state,
            snap=snap,
            deadline=deadline,
            attempts=replace(self._retry, label=f"during join of {self.me}").attempts(),
            poll=self.periods.quick(self.session.read_latency),
            next_own=start,
            next_sweep=start + self.periods.first_sweep(self.settings, request.leave_round, self._rng.random()),
            progress_at=start,
            looked_at=start,
        )
        return self._loop(run)

    def _ask(self, leave_round: int | None, deadline: float) -> JoinRequest:
        """Write this node's join request record (with the master port it offers for this round)."""
        self.node = replace(self.node, port=self._port_factory(self.node.addr))
        request = self._new_request(leave_round)
        self._retry(lambda: self.requests.put(request), deadline)
        return request

    def _new_request(self, leave_round: int | None) -> JoinRequest:
        # Ordered nonces: a stale listing that still shows this node's previous request can never refold it.
        self._request_count += 1
        return JoinRequest(self.node, f"{self._request_count}.{secrets.token_hex(6)}", leave_round)

    def _reuse_if_finished(
        self, state: RendezvousState | None, snap: Snapshot | None
    ) -> tuple[RendezvousState | None, Snapshot | None]:
        """A closed run whose nodes are all gone starts afresh; a live closed run stays closed."""
        start = self._clock()
        while state is not None and policy.may_reuse(state, self.me) and state.epoch not in self._epochs:
            members = state.members()
            tags = self.beats.tags()
            now = self._clock()
            self.liveness.observe(tags, now, members)
            gone = self.liveness.missing(tags, members) | self.liveness.dead(members, now)
            verdict = policy.reuse_verdict(gone, members, now - start, self.settings)
            if verdict == "restart":
                return self.admin.restart(state, snap)
            if verdict == "closed":
                break  # someone of the old job is still alive: the run is really closed
            self.session.sleep(policy.reuse_poll(self.settings))
            state, snap = self.session.read()
        return state, snap

    # -- the loop ------------------------------------------------------------------------------------------

    def _loop(self, run: JoinProgress) -> RendezvousState:
        while True:
            try:
                done = self._step(run)
            except StorageError as exc:
                run.attempts.failed(exc, run.deadline)
                # Our records are written; read again and go on (the loop re-folds if need be).
                with contextlib.suppress(StorageError):
                    run.state, run.snap = self.session.read()
                continue
            if done is not None:
                return done

    def _view(self, run: JoinProgress, now: float) -> policy.JoinView:
        state, me = run.state, self.me
        seen_at = None
        if state is not None:
            if (state.epoch, state.generation) != run.seen:
                run.seen, run.progress_at = (state.epoch, state.generation), now
            spare = me in state.redundancy_list
            run.deadline = policy.join_deadline(
                run.deadline, was_spare=run.was_spare, state=state, me=me, now=now, timeout=self.settings.join_timeout
            )
            run.was_spare = spare
            key = policy.last_call_key(state)
            if key is not None and me in state.participants and state.applied.get(me) == run.request.nonce:
                seen_at = self._last_call_seen.setdefault(key, now)
        return policy.JoinView(
            me=me,
            settings=self.settings,
            request=run.request,
            state=state,
            now=now,
            deadline=run.deadline,
            progress_at=run.progress_at,
            own_folds=run.own_folds,
            next_own=run.next_own,
            next_sweep=run.next_sweep,
            last_call_seen_at=seen_at,
            was_folder=run.was_folder,
        )

    def _step(self, run: JoinProgress) -> RendezvousState | None:
        if not run.reuse_checked and run.state is not None:  # the first document this join sees
            run.state, run.snap = self._reuse_if_finished(run.state, run.snap)
            run.reuse_checked = True
        now = self._clock()
        view = self._view(run, now)
        self.progress.tick(view.state, now, view.last_call_seen_at)
        action = policy.decide(view)
        if isinstance(action, policy.CreateDocument):
            self.former.create(run, view)
            return None
        state = run.state
        assert state is not None  # the policy asks for a document first
        if isinstance(action, policy.ReturnInfo):
            self._epochs.add(state.epoch)
            return state
        if isinstance(action, policy.RaiseClosed):
            self.heartbeat.stop()
            _raise_closed(self.settings, action.spare)
        if isinstance(action, policy.RollBack):
            self.admin.roll_back(state, run.snap, self.me, policy.ROLLBACK_WINDOW)
            _raise_timeout(self.settings, state, self.progress.missing(state, now))
        if isinstance(action, policy.RaiseMismatch):
            self.admin.roll_back(state, run.snap, self.me, policy.ROLLBACK_WINDOW)
            self.heartbeat.stop()
            if self.requests.own_name is not None:
                self.session.discard("req", self.requests.own_name)
            _raise_mismatch(self.settings, action.what)
        self._act(action, run, state, now)
        return None

    def _act(self, action: policy.Action, run: JoinProgress, state: RendezvousState, now: float) -> None:
        if isinstance(action, policy.Rejoin):
            run.request = self._new_request(None)
            self.requests.put(run.request)
            self.heartbeat.beat()
            run.own_folds, run.next_own = 0, now
        elif isinstance(action, policy.Write):
            if action.why == "fold own":
                run.own_folds += 1
                run.next_own = now + self._rng.uniform(0, policy.own_fold_jitter(run.own_folds))
            _, run.state, run.snap = self.session.cas(action.state, run.snap)
        elif isinstance(action, policy.Sweep):
            run.next_sweep = now + self.periods.sweep
            self._sweep(run, state)
        elif isinstance(action, policy.Poll):
            self._poll(run, action, state)

    def _sweep(self, run: JoinProgress, state: RendezvousState) -> None:
        """Remove the members whose heartbeat stopped changing (this observer's clock), with one write."""
        members = state.members() - {self.me}
        tags = self.beats.tags()
        now = self._clock()  # when we looked (the read budget may have made us wait)
        self.liveness.observe(tags, now, members)
        self.liveness.forget(members)
        dead = self.liveness.dead(members, now)
        # Look again when a silent member would be due, not up to a sweep period later.
        due = self.liveness.next_death(members - dead)
        if due is not None:
            run.next_sweep = min(run.next_sweep, max(due, now + self.periods.fast))
        if dead:
            log.info("removing node(s) without heartbeat for %.1fs: %s", self.settings.liveness_timeout, sorted(dead))
            _, run.state, run.snap = self.admin.remove_dead(state, run.snap, dead)

    def _poll(self, run: JoinProgress, action: policy.Poll, state: RendezvousState) -> None:
        """Wait, then look: the folder lists and folds the requests, every other node reads the document."""
        if action.look_now:
            # Requests may have waited since the previous folder's last fold; the watch starts first, so that
            # none arrives unseen in between.
            self.session.watch("folder")
        else:
            self.session.wait(run.poll, "folder" if action.folder else "waiter")
        run.was_folder = action.folder
        before = state.generation
        if action.folder:
            self.former.fold_pending(run)
        else:
            run.state, run.snap = self.session.read()
            run.looked_at = self._clock()
        run.attempts.reset()
        got = run.state
        run.poll = self.periods.next_poll(
            run.poll,
            changed=got is not None and got.generation != before,
            idle=got is not None and (got.complete or self.me in state.redundancy_list),
            latency=self.session.read_latency,
        )


def _raise_closed(settings: Settings, spare: bool) -> NoReturn:
    run_id = settings.run_id
    if spare:
        raise RendezvousGracefulExitError(
            f"rendezvous {run_id!r} was closed while this node waited as a spare; exiting normally"
        )
    raise RendezvousClosedError(
        f"rendezvous {run_id!r} is closed; start a new job (a finished run id is reused once all its nodes are gone)"
    )


def _raise_mismatch(settings: Settings, what: str) -> NoReturn:
    raise ConfigurationError(
        f"run {settings.run_id!r} was started with other settings: {what}; give every node the same --nnodes and "
        "last_call_timeout, or use another run id"
    )


def _raise_timeout(settings: Settings, state: RendezvousState, missing: str) -> NoReturn:
    raise RendezvousTimeoutError(
        f"rendezvous {settings.run_id!r} did not complete within join_timeout="
        f"{settings.join_timeout:g}s: {len(state.participants)} participant(s), "
        f"min_nodes={settings.min_nodes}{missing}; check that the other nodes use the same endpoint and "
        "run id, or raise join_timeout"
    )
