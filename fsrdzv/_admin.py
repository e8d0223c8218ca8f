"""Every change to a run's document outside a join goes through here, and the join engine uses it too.

:class:`RunAdmin` applies ``_protocol`` transitions through a :class:`~fsrdzv._session.Session`: with the read
budget, the ``ops`` counters and the completion announcement, whoever calls it (a node closing the run or
removing dead peers, ``fsrdzv close`` / ``reset`` / ``gc``, the launcher). Faces never touch the encoder or the
protocol themselves.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from . import _protocol as proto
from ._errors import RendezvousError, RendezvousStateError, RendezvousTimeoutError, StorageError
from ._periods import FAST_POLL, SLOW_POLL, outage_budget
from ._records import SignedBeats
from ._retry import Retry
from ._session import Session
from ._settings import Settings
from ._state import RendezvousState, decode_request, decode_request_name, request_owner
from ._store import Snapshot, Store

__all__ = ["CloseResult", "ResetResult", "RunAdmin"]

log = logging.getLogger("fsrdzv")


class CloseResult(NamedTuple):
    """The document after :meth:`RunAdmin.close` (None: there was none and none was made)."""

    state: RendezvousState | None
    already_closed: bool


class ResetResult(NamedTuple):
    """What :meth:`RunAdmin.reset` replaced: the old document (None if absent or unreadable), why it was
    unreadable (the error's text), and the fresh document."""

    previous: RendezvousState | None
    unreadable: str | None
    state: RendezvousState


class RunAdmin:
    """Every change to a run's document outside a join goes through here (and the engine uses it too).

    :param settings: needed by :meth:`remove_nodes` (the protocol's participant rules); the other operations
        work without.
    :param session: the budgeted, counted I/O to share (a handler passes its own); by default a new one.
    :param retry: how storage errors are retried (a handler passes its own, which names it in the log).
    """

    def __init__(
        self,
        store: Store,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        session: Session | None = None,
        retry: Retry | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.session = session or Session(store, clock=clock, sleep=sleep)
        self._clock = clock
        self._rng = rng or random.Random()
        self._retry = retry or Retry(
            delay=2 * FAST_POLL,
            max_delay=SLOW_POLL,
            outage=float("inf") if settings is None else outage_budget(settings),
            label=f"for run {store.run_id!r}",
            clock=clock,
            sleep=sleep,
            rng=self._rng,
        )
        #: The close loop's pause after a lost race: short, growing to a slow poll.
        self._race = Retry(delay=FAST_POLL, max_delay=SLOW_POLL, clock=clock, sleep=sleep, rng=self._rng)
        #: On a signed store, which watched peers' heartbeats count (see heartbeat_tags).
        self._beats = SignedBeats(self.session)

    @property
    def run_id(self) -> str:
        return self.store.run_id

    # -- reading -------------------------------------------------------------------------------------------

    def read(self) -> RendezvousState | None:
        """The current document (None if the run has none)."""
        return self.session.read()[0]

    def read_snapshot(self) -> tuple[RendezvousState | None, Snapshot | None]:
        return self.session.read()

    def heartbeat_tags(self, node_ids: Iterable[str]) -> dict[str, str]:
        """Tags of the heartbeat records of ``node_ids`` (a few peers: one request each, no listing, no body).

        With a job secret a tag alone says nothing about the signature: where tags are the MD5 of the stored bytes
        (object stores) a newer beat is recognised by the digest this observer predicts for it, else (and when no
        prediction matches) the record is read and verified. A record that cannot be trusted, or an older signed one
        written again (:class:`SignedBeats`), keeps the tag of the peer's last one that could: neither counts as a
        change, so neither can keep a dead node alive.
        """
        session = self.session
        tags: dict[str, str] = {}
        for node_id in node_ids:
            tag = self._beats.watched(node_id) if session.store.signed else session.tag("hb", node_id)
            if tag is not None:
                tags[node_id] = tag
        return tags

    # -- writing -------------------------------------------------------------------------------------------

    def close(self, timeout: float, *, create: bool = True) -> CloseResult:
        """Close the run for every node; idempotent.

        Storage errors are retried until ``timeout`` (at once if permanent); a lost race reads and tries again.
        With ``create`` a missing document is created closed (so that nodes arriving later stop at once).

        :raises RendezvousTimeoutError: the document kept changing for ``timeout`` seconds.
        """
        deadline = self._clock() + timeout
        race = self._race.attempts()
        while True:
            state, snap = self._retry(self.session.read, deadline)
            if state is None:
                if not create:
                    return CloseResult(None, False)
                state = proto.new_state(self.run_id, secrets.token_hex(8))
            if state.closed:
                return CloseResult(state, True)
            closed = proto.close(state)
            try:
                won, _, _ = self.session.cas(closed, snap)
            except StorageError as exc:
                # Retrying cannot fix a permanent error (a bad endpoint): report it at once, not after close_timeout.
                if exc.errno in self._retry.permanent or self._clock() > deadline:
                    raise
                won = False  # maybe written, maybe not: the next read tells (closing is idempotent)
            if won:
                return CloseResult(closed, False)
            if self._clock() > deadline:
                raise RendezvousTimeoutError(
                    f"could not close rendezvous {self.run_id!r} within close_timeout={timeout:g}s"
                )
            race.pause()

    def reset(self) -> ResetResult:
        """Replace the document whatever it holds and delete every record; the generation continues above the
        old one so that no old token or request can ever match again."""
        previous: RendezvousState | None = None
        unreadable: str | None = None
        try:
            previous = self.read()
        except RendezvousStateError as exc:
            unreadable = str(exc)
        # Unreadable: continue above every generation the store ever wrote (its envelope, its log), so that no
        # token or mark of the old document can match the new one (no ABA).
        generation = previous.generation + 1 if previous is not None else self._written_floor()
        fresh = proto.new_state(self.run_id, secrets.token_hex(8), generation)
        self.session.reset(fresh)
        return ResetResult(previous, unreadable, fresh)

    def _written_floor(self) -> int:
        envelope = 0
        with contextlib.suppress(RendezvousStateError):
            snap = self.store.read()
            envelope = 0 if snap is None else snap.generation
        return max(envelope, self.store.highest_generation()) + 1

    def remove_nodes(self, node_ids: Iterable[str]) -> RendezvousState | None:
        """Remove nodes (dead, or gone) from every list in one compare-and-set; the document after it (None if
        the run has none). A lost race is not retried: the caller looks again at its next check."""
        state, snap = self.session.read()
        if state is None or snap is None:
            return state
        return self.remove_from(state, snap, node_ids)[1]

    def delete_run(self) -> None:
        """Delete the document and every record of the run (``fsrdzv gc``)."""
        self.session.ops["delete"] += 1
        self.store.delete_run()

    def forget_records(self, node_ids: Iterable[str]) -> None:
        """Delete the heartbeat and join-request records of removed nodes, best effort: a crashed node's leftover
        request must never be folded again, whatever the document's history of departed nodes still holds."""
        doomed = set(node_ids)
        if not doomed:
            return
        with contextlib.suppress(RendezvousError):
            for name in self.session.list("req"):
                if request_owner(name) in doomed:
                    self.session.discard("req", name)
        for node_id in doomed:
            self.discard_record("hb", node_id)

    @staticmethod
    def recorded_liveness_timeout(state: RendezvousState | None) -> float:
        """The run's liveness timeout as its document records it (0 when it does not: an older fsrdzv wrote it)."""
        return 0.0 if state is None else proto.recorded_liveness_timeout(state.config)

    def folded_requests(self, state: RendezvousState | None, names: Iterable[str]) -> list[str]:
        """The join-request records among ``names`` that ``state`` already folded, or older ones of the same node
        (ordered nonces): leftovers of nodes that left, never a pending request (``fsrdzv gc``). A record that does
        not decode, or cannot be trusted, is not judged."""
        if state is None:
            return []
        out = []
        for name in names:
            try:
                request = decode_request_name(name, lambda _: None)
                if request is None:
                    raw = self.session.get_unbudgeted("req", name)
                    request = None if raw is None else decode_request(raw, f"join request {name!r}")
            except RendezvousError:
                continue
            if request is not None and not proto.pending(state, [request]):
                out.append(name)
        return out

    def discard_record(self, kind: str, name: str) -> None:
        """Delete one record, best effort (a node's own records at shutdown: a leftover is harmless)."""
        with contextlib.suppress(RendezvousError):
            self.session.delete(kind, name)

    # -- the engine's transitions on a document it already holds -------------------------------------------

    def remove_from(
        self, state: RendezvousState, snap: Snapshot | None, node_ids: Iterable[str]
    ) -> tuple[bool, RendezvousState | None, Snapshot | None]:
        """Remove ``node_ids`` from ``state`` (read as ``snap``) with one compare-and-set."""
        new = proto.remove_nodes(state, node_ids, self._needs_settings())
        if new is state:
            return False, state, snap
        return self.session.cas(new, snap)

    def remove_dead(
        self, state: RendezvousState, snap: Snapshot | None, node_ids: Iterable[str]
    ) -> tuple[bool, RendezvousState | None, Snapshot | None]:
        """:meth:`remove_from` for nodes judged dead, and once removed their records deleted (``forget_records``)."""
        dead = set(node_ids)
        outcome = self.remove_from(state, snap, dead)
        if outcome[0]:
            self.forget_records(dead)
        return outcome

    def roll_back(self, state: RendezvousState, snap: Snapshot | None, node_id: str, window: float) -> None:
        """Take ``node_id`` out of the document (its join timed out), trying for ``window`` seconds at most."""
        stop = self._clock() + window
        while self._clock() < stop and node_id in state.members():
            try:
                won, got, snap = self.remove_from(state, snap, [node_id])
            except RendezvousError:
                return
            if won or got is None:
                return
            state = got

    def restart(self, state: RendezvousState, snap: Snapshot | None) -> tuple[RendezvousState | None, Snapshot | None]:
        """Start a closed run whose nodes are all gone afresh (run id reuse), removing their requests first."""
        members = state.members()
        log.info("run %r was closed and all its nodes are gone: starting it afresh", self.run_id)
        for name in self.store.list_records("req"):
            if request_owner(name) in members:
                self.session.discard("req", name)
        _, got, got_snap = self.session.cas(proto.restart(state, secrets.token_hex(8)), snap)
        if got is not None and got.closed:
            return self.session.read()
        return got, got_snap

    def _needs_settings(self) -> Settings:
        if self.settings is None:
            raise ValueError("RunAdmin needs the run's settings to remove nodes")
        return self.settings
