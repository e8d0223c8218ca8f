"""The rendezvous handler: torch's ``DynamicRendezvousHandler`` contract on an fsrdzv store, torch-free.

How a join works (the I/O shell around the pure rules of ``_protocol``):

1. The node writes its heartbeat record ``hb/<id>`` and its join request record (its own objects: no
   contention). The request travels in the record's *name*, so one listing shows every pending request.
2. While a round forms, one waiting member, the *folder* (the one whose request was folded first), is the only
   writer of the document: it lists the request records at every poll and folds all pending ones in one
   compare-and-set. A joiner that sees a folder at work writes nothing more; it folds its own request only when
   there is no folder (the first arrival), once to join the wait list of a complete round, or when the document
   has not changed for ``FOLD_GRACE`` seconds (the folder may be stuck).
3. Nodes poll the document, fast while a round forms and slower while nothing changes, never faster than the
   read budget (``READ_RATE`` + ``READ_BURST`` reads in any second per node) nor than ``max_nodes /
   AGGREGATE_READ_RATE`` (the whole job's polling stays bounded at any scale). On a local directory they sleep
   on inotify instead: the folder wakes on a new request, the others on the announcement of a completed round.
4. A participant that has watched the last-call mark for ``last_call_timeout`` seconds of its own monotonic
   time completes the round. Reaching ``max_nodes`` completes it at once, in the folding write.
5. Waiting nodes list the heartbeat records now and then; a member whose record has not changed for
   ``keep_alive_interval x keep_alive_max_attempt`` seconds (observer's clock) is removed with one CAS.

Error handling: storage failures surface as :class:`RendezvousConnectionError` (``StorageError``) after the
operation's own retries; an unreadable document raises :class:`StateCorruptError` and is never overwritten;
a closed run raises :class:`RendezvousClosedError` (a spare gets :class:`RendezvousGracefulExitError`); a join
that does not finish within ``join_timeout`` rolls back and raises :class:`RendezvousTimeoutError`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ._address import AddressChoice, local_identity
from ._admin import RunAdmin
from ._errors import RendezvousError, RendezvousStateError
from ._join import Joiner
from ._keepalive import Heartbeat, Runtime, ThreadRuntime
from ._peers import PeerWatch
from ._periods import FAST_POLL, SLOW_POLL, outage_budget
from ._retry import Retry
from ._roster import expected_nodes as expected_nodes_of
from ._scaleup import ScaleUpGate, ScaleUpPolicy
from ._secret import job_secret, read_secret_file
from ._session import Session
from ._settings import Settings
from ._state import NodeInfo, RendezvousState, new_node_nonce
from ._steady import SteadyReads
from ._store import Store
from ._stores import open_store

__all__ = ["RendezvousHandler", "RendezvousInfo", "create_handler", "read_secret_file"]

log = logging.getLogger("fsrdzv")

_local_ids = itertools.count()
_local_ids_lock = threading.Lock()

Clock = Callable[[], float]
Sleep = Callable[[float], None]


@dataclass(frozen=True)
class RendezvousInfo:
    """What a completed rendezvous gives this node."""

    round: int
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    #: Addresses of the participants in rank order.
    participants: tuple[str, ...]
    run_id: str = ""


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
        try:
            s.bind((addr, 0))
        except OSError:
            s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port


def _info(state: RendezvousState, node_id: str) -> RendezvousInfo:
    # The roster fixed at completion is the round's world, even if some participants already left it.
    assert state.master is not None
    return RendezvousInfo(
        round=state.round,
        rank=state.participants[node_id],
        world_size=len(state.roster),
        master_addr=state.master[0],
        master_port=state.master[1],
        participants=state.roster,
        run_id=state.run_id,
    )


class RendezvousHandler:
    """One node's view of an elastic rendezvous. Use :func:`create_handler` to make one.

    The API follows torch's ``RendezvousHandler``: :meth:`next_rendezvous`, :meth:`num_nodes_waiting`,
    :meth:`is_closed`, :meth:`set_closed`, :meth:`shutdown`. It is also a context manager that shuts down on exit.

    :param runtime: where the keep-alive runs (threads by default; the simulation passes virtual-time ones).
    :param port_factory: picks the master port this node offers for a round it may lead (default: a free
        ephemeral port); a face that can hold the port open until it serves on it (torchrun's TCPStore) passes
        its own.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        local_addr: str | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        rng: random.Random | None = None,
        port_factory: Callable[[str], int] | None = None,
        runtime: Runtime | None = None,
        scale_up: ScaleUpPolicy | None = None,
    ) -> None:
        if store.run_id != settings.run_id:
            raise ValueError("the store and the settings name different run ids")
        self.store = store
        self.settings = settings
        self._clock = clock
        runtime = runtime or ThreadRuntime()
        rng = rng or random.Random()
        with _local_ids_lock:
            local_id = next(_local_ids)
        addr = local_addr or socket.getfqdn()
        node = NodeInfo(addr, os.getpid(), local_id, new_node_nonce(), 0, socket.gethostname())
        self.node_id = node.node_id
        self._lock = threading.RLock()
        # Watches only with the real sleep: an injected sleep (tests, simulation) keeps full control of time.
        self._session = Session(
            store, clock=clock, sleep=sleep, watching=sleep is time.sleep, documents=runtime.documents()
        )
        #: Storage operations made by this handler, by kind (benchmarks and tests read them).
        self.ops = self._session.ops
        retry = Retry(
            delay=2 * FAST_POLL,
            max_delay=SLOW_POLL,
            outage=outage_budget(settings),
            label=f"for {self.node_id}",
            clock=clock,
            sleep=sleep,
            rng=rng,
        )
        self._retry = retry
        self._admin = RunAdmin(store, settings, clock=clock, sleep=sleep, rng=rng, session=self._session, retry=retry)
        identity = local_identity(local_addr)
        self._address = AddressChoice(identity)
        fields = identity.beat_fields()
        self._session.lead = {"node": self.node_id, **fields}
        self._heartbeat = Heartbeat(
            self._session, self.node_id, settings.keep_alive_interval, runtime, clock, fields=fields
        )
        offer, bind = port_factory or _free_port, local_addr or ""  # without local_addr, on every interface
        self._joiner = Joiner(
            settings=settings,
            session=self._session,
            admin=self._admin,
            heartbeat=self._heartbeat,
            node=node,
            rng=rng,
            retry=retry,
            port_factory=lambda _addr: offer(bind),
        )
        self._steady = SteadyReads(self._session, rng)
        self._gate = ScaleUpGate(scale_up or ScaleUpPolicy(), self._session, self.node_id, clock)
        self._finalizer = weakref.finalize(self, self._heartbeat.stopper())
        self._peers = PeerWatch(self._admin, settings, self.node_id, clock)

    # -- identity ------------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.settings.run_id

    def get_run_id(self) -> str:
        return self.settings.run_id

    @property
    def admin(self) -> RunAdmin:
        """Changes to the run's document outside a join (the launcher's removals), through this node's budgeted
        and counted I/O."""
        return self._admin

    @property
    def node(self) -> NodeInfo:
        """This node's identity as its last join request carried it (with the master port it offered)."""
        return self._joiner.node

    @property
    def scale_up(self) -> ScaleUpGate:
        """Whether waiting newcomers are reported now (``scale_up_at``); the launcher asks it too."""
        return self._gate

    @property
    def heartbeats(self) -> int:
        """Heartbeats this node wrote so far."""
        return self._heartbeat.count

    # -- the public API ------------------------------------------------------------------------------------

    def next_rendezvous(self) -> RendezvousInfo:
        """Join the next round and block until it is complete with this node as a participant.

        :raises RendezvousClosedError: the run was closed.
        :raises RendezvousGracefulExitError: the run closed while this node was a spare.
        :raises RendezvousTimeoutError: no round completed with this node within ``join_timeout``.
        :raises RendezvousConnectionError: the storage failed persistently.
        :raises RendezvousStateError: the document is unreadable or from a newer fsrdzv.
        """
        with self._lock:
            self._peers.hand_over(self._joiner.liveness)  # a dead peer is timed from its last beat, not from now
            self._peers.stop()  # this node leaves its round: nothing of it is watched any more
            try:
                state = self._joiner.join()
                master = self._address.choose(state, self.node_id, lambda rank0: self._rank0_beat(state, rank0))
            except BaseException:
                # Like torch: no heartbeats unless joined. Others then see this node go within the timeout.
                self._stop_keepalive()
                raise
            self._keepalive_started()
            self._peers.start(state)
            # Refresh the cache too: a read from before the round formed would still show this round's nodes as
            # waiting, and an agent polling num_nodes_waiting would restart for nothing.
            self._steady.hold(state)
            return replace(_info(state, self.node_id), master_addr=master)

    def _rank0_beat(self, state: RendezvousState, node_id: str) -> bytes | None:
        """Rank 0's address candidates: from the document when rank 0 wrote it in this round (``lead``), else
        its heartbeat record; None if that is missing or untrusted."""
        if state.lead is not None and state.lead.get("node") == node_id:
            return json.dumps(dict(state.lead)).encode()
        try:
            raw: bytes | None = self._retry(
                lambda: self._session.get_unbudgeted("hb", node_id), self._clock() + self.settings.heartbeat_timeout
            )
        except RendezvousStateError:
            return None
        return raw

    def _keepalive_started(self) -> None:
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, self._heartbeat.stopper())

    def _cached_state(self) -> RendezvousState | None:
        # A conditional read once per steady period (see _steady): an unchanged document costs no body.
        now = self._clock()
        if self._steady.due(now):
            self._retry(self._steady.refresh, now + self.settings.heartbeat_timeout)
        return self._steady.state

    def num_nodes_waiting(self) -> int:
        """Nodes waiting to join the next round (not counting spares), from a read at most ~5 s old (``_steady``)."""
        with self._lock:
            state = self._cached_state()
            # A lost participant (a hung or dead host) makes the agents re-rendezvous as a waiting node does.
            return self._gate.waiting(state) or self._peers.lost(state)

    def is_closed(self) -> bool:
        """Whether the run is closed (from a read at most ~5 s old)."""
        with self._lock:
            state = self._cached_state()
            return state is not None and state.closed

    def set_closed(self) -> None:
        """Close the run for every node. Idempotent.

        :raises RendezvousTimeoutError: it could not be written within ``close_timeout``.
        """
        with self._lock:
            try:
                self._admin.close(self.settings.close_timeout)
            finally:
                self._steady.forget()

    def _stop_keepalive(self) -> None:
        """Stop heartbeating (as a node that died would); tests of other nodes' reactions use it too."""
        self._heartbeat.stop()

    def shutdown(self) -> bool:
        """Stop the keep-alive, close the run (as torch does) and remove this node's records.

        Returns True on success; False if the run could not be closed (the error is logged).
        """
        self._stop_keepalive()
        self._session.close_watches()
        self._gate.close()
        try:
            self.set_closed()
        except RendezvousError as exc:
            log.warning("shutdown of %s could not close rendezvous %r: %s", self.node_id, self.run_id, exc)
            return False
        # Our records are the proof that we are alive: remove them so that a new job can reuse the run id now.
        records = [("hb", self.node_id)]
        own = self._joiner.requests.own_name
        if own is not None:
            records.append(("req", own))
        for kind, name in records:
            self._admin.discard_record(kind, name)
        return True

    def __enter__(self) -> RendezvousHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def create_handler(
    endpoint: str,
    run_id: str,
    min_nodes: int,
    max_nodes: int,
    *,
    local_addr: str | None = None,
    storage_options: dict[str, Any] | None = None,
    join_timeout: float = Settings.join_timeout,
    last_call_timeout: float = Settings.last_call_timeout,
    close_timeout: float = Settings.close_timeout,
    keep_alive_interval: float = Settings.keep_alive_interval,
    keep_alive_max_attempt: int = Settings.keep_alive_max_attempt,
    heartbeat_timeout: float = Settings.heartbeat_timeout,
    secret: bytes | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    port_factory: Callable[[str], int] | None = None,
    scale_up_at: str = "any_time",
    scale_up_max_delay: float = ScaleUpPolicy.max_delay,
    expected_nodes: Sequence[str] | None = None,
) -> RendezvousHandler:
    """Create a rendezvous handler for ``run_id`` at ``endpoint`` (see :func:`fsrdzv.open_store`).

    Timeouts are seconds (floats allowed) with torch's defaults. ``secret`` (or the file named by the environment
    variable ``FSRDZV_SECRET_FILE``) turns on HMAC authentication of every document and record. ``clock`` and
    ``sleep`` are injectable (tests, simulation); ``port_factory(addr)`` picks the master port this node offers.
    ``scale_up_at="safe_point"`` holds waiting newcomers back until every participant called
    :func:`fsrdzv.safe_point`, or for at most ``scale_up_max_delay`` seconds (see ``fsrdzv._scaleup``).
    ``expected_nodes``: the host names the job expects (items may use Slurm's ``node[01-03]``; default: the
    environment's ``SLURM_JOB_NODELIST``): progress lines and the join-timeout message name the missing ones.

    :raises ConfigurationError: an invalid value (negative timeout, min > max, bad run id or endpoint).
    """
    settings = Settings(
        run_id=run_id,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        join_timeout=join_timeout,
        last_call_timeout=last_call_timeout,
        close_timeout=close_timeout,
        heartbeat_timeout=heartbeat_timeout,
        keep_alive_interval=keep_alive_interval,
        keep_alive_max_attempt=keep_alive_max_attempt,
        expected_nodes=expected_nodes_of(expected_nodes),
    )
    scale_up = ScaleUpPolicy.parse(scale_up_at, scale_up_max_delay)
    if secret is None:
        secret = job_secret()
    store = open_store(endpoint, run_id, storage_options=storage_options, secret=secret)
    return RendezvousHandler(
        store,
        settings,
        local_addr=local_addr,
        clock=clock,
        sleep=sleep,
        port_factory=port_factory,
        scale_up=scale_up,
    )
