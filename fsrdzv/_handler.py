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

import contextlib
import errno
import itertools
import logging
import os
import random
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from . import _protocol as proto
from ._errors import (
    ConfigurationError,
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
    StorageError,
)
from ._liveness import LivenessTracker
from ._settings import Settings
from ._state import (
    INLINE_PREFIX,
    JoinRequest,
    NodeInfo,
    RendezvousState,
    decode_request,
    decode_request_name,
    decode_state,
    encode_request,
    encode_state,
    request_owner,
    request_record_name,
)
from ._store import ChangeWatch, Snapshot, Store
from ._stores import open_store

__all__ = ["RendezvousHandler", "RendezvousInfo", "create_handler"]

log = logging.getLogger("fsrdzv")

#: Poll period while a round is forming or anything just changed (s), so the last arrival's completing write is
#: seen within ~60 ms (where no watch wakes the node sooner; the read budget below caps it at 12 reads/s).
FAST_POLL: Final = 0.06
#: Read budget of one node (token bucket): at most READ_RATE + READ_BURST reads of the store in any second.
READ_RATE: Final = 12.0
READ_BURST: Final = 8.0
#: Polls of the whole job stay under this many reads per second: the poll period is at least max_nodes / this
#: (a 1,000-node job polls every 0.5 s, well under S3's 5,500 GETs/s per prefix and an NFS server's capacity).
AGGREGATE_READ_RATE: Final = 2000.0
#: Heartbeat sweeps of the whole job stay under this many listings per second (a 4,096-node job sweeps every 8 s).
AGGREGATE_SWEEP_RATE: Final = 500.0
#: A joiner whose request was not folded folds it itself once the document has not changed for this long (the
#: folder may be stuck; a dead one is removed by the liveness sweep after the liveness timeout).
FOLD_GRACE: Final = 5.0
#: After a watch wakes a node, it waits this long before reading, so that a burst of changes costs one read.
WAKE_SETTLE: Final = 0.01
#: Record kind of the announcement that a round completed (see RendezvousHandler._announce).
COMPLETE_KIND: Final = "done"
#: The folder reads the document when it has not seen it for this many fast polls; in between it folds into what
#: it last saw.
FOLDER_READ_EVERY: Final = 4
#: Compare-and-sets one fold tries before it waits for the next poll (each lost one returned the new document).
FOLD_ATTEMPTS: Final = 3
#: A heartbeat that failed is retried after about this long (s; at most the keep-alive interval), not a full interval.
BEAT_RETRY: Final = 0.5
#: Poll period once nothing has changed for a while (s).
SLOW_POLL: Final = 1.0
#: Growth factor of the poll period while nothing changes.
POLL_GROWTH: Final = 1.3
#: How long a node keeps trying to take itself out after its join timed out (torch: 5 s).
ROLLBACK_WINDOW: Final = 5.0
#: How long ``num_nodes_waiting`` / ``is_closed`` answers from the last read (torch: 1 s).
READ_CACHE: Final = 1.0
#: A waiting node rides out a storage outage for at least this long (s), and at least twice the liveness
#: timeout, before it gives up (unless the join deadline comes first).
MIN_OUTAGE: Final = 10.0
#: Errors that retrying cannot fix: report them at once.
PERMANENT_ERRNOS: Final = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT})

_local_ids = itertools.count()
_local_ids_lock = threading.Lock()

_T = TypeVar("_T")
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


class _ReadBudget:
    """A token bucket over one node's reads: at most ``rate + burst`` reads in any one-second window.

    Every read of the store while joining takes a token, so the per-node read rate holds by construction
    whatever the node's role (joiner, folder, sweeper), with the clock and sleep of the handler.
    """

    def __init__(self, rate: float, burst: float, clock: Clock, sleep: Sleep) -> None:
        self._rate, self._burst = rate, burst
        self._clock, self._sleep = clock, sleep
        self._tokens = burst
        self._last = clock()

    def take(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self._sleep((1 - self._tokens) / self._rate)
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
        self._tokens -= 1


def next_beat_in(interval: float, started: float, now: float, landed: bool, rng: random.Random) -> float:
    """Seconds from ``now`` until the next heartbeat, after one that started at ``started``.

    Beats keep a fixed schedule (one per ``interval`` from the start of the previous one, so that a slow write does
    not stretch the period by its own latency), but never closer than a quarter interval (a store slowed by load
    is not beaten harder). A beat that failed is retried soon (jittered), not a full interval later: others judge
    this node by the time between two beats that landed, and under throttling one failure must not cost a whole
    interval on top of the time the failed write took.
    """
    if landed:
        return max(started + interval - now, interval / 4)
    return min(interval, BEAT_RETRY) * rng.uniform(0.5, 1.5)


class _KeepAlive:
    """Writes this node's heartbeat record every interval, on a daemon thread (schedule: :func:`next_beat_in`).

    It holds only a weak reference to the handler, so a forgotten handler is collected and the thread stops.
    Failures are logged and retried soon: a heartbeat is idempotent.
    """

    def __init__(self, handler: RendezvousHandler, interval: float) -> None:
        self._stop = threading.Event()
        self._ref = weakref.ref(handler)
        self.thread = threading.Thread(
            target=self._run, args=(interval,), name=f"fsrdzv-keepalive-{handler.node_id}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def _run(self, interval: float) -> None:
        rng = random.Random()
        wait = interval
        while not self._stop.wait(wait):
            handler = self._ref()
            if handler is None:
                return
            started, landed = time.monotonic(), False
            try:
                handler._beat()
                landed = True
            except RendezvousError as exc:
                log.warning("keep-alive of %s failed (retrying soon): %s", handler.node_id, exc)
            except Exception:  # a bug must not kill liveness silently; log it loudly and go on
                log.exception("unexpected error in the keep-alive of %s", handler.node_id)
            del handler
            wait = next_beat_in(interval, started, time.monotonic(), landed, rng)

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)


class _Backoff:
    """Consecutive storage failures of one wait: jittered exponential sleeps, then give up.

    A wait gives up at once on errors retrying cannot fix (``PERMANENT_ERRNOS``), at the deadline, or once storage
    has kept failing for longer than others need to see this node dead (``_outage_budget``).
    """

    def __init__(self, handler: RendezvousHandler, during: str = "for") -> None:
        self._handler = handler
        self._during = during
        self._errors = 0
        self._first = 0.0

    def reset(self) -> None:
        self._errors = 0

    def failed(self, exc: StorageError, deadline: float) -> None:
        """Sleep before the next try, or re-raise ``exc`` if the wait must give up."""
        h = self._handler
        now = h._clock()
        self._errors += 1
        if self._errors == 1:
            self._first = now
        if exc.errno in PERMANENT_ERRNOS or now > deadline or now - self._first > h._outage_budget():
            raise exc
        log.warning("storage error %s %s (retrying): %s", self._during, h.node_id, exc)
        h._sleep(min(SLOW_POLL, FAST_POLL * 2**self._errors) * h._rng.uniform(0.5, 1.5))


class RendezvousHandler:
    """One node's view of an elastic rendezvous. Use :func:`create_handler` to make one.

    The API follows torch's ``RendezvousHandler``: :meth:`next_rendezvous`, :meth:`num_nodes_waiting`,
    :meth:`is_closed`, :meth:`set_closed`, :meth:`shutdown`. It is also a context manager that shuts down on exit.
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
    ) -> None:
        if store.run_id != settings.run_id:
            raise ValueError("the store and the settings name different run ids")
        self.store = store
        self.settings = settings
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        #: Picks the master port this node offers for a round it may lead (default: a free ephemeral port).
        #: A face that can hold the port open until it serves on it (torchrun's TCPStore) passes its own.
        self._port_factory = port_factory or _free_port
        with _local_ids_lock:
            local_id = next(_local_ids)
        addr = local_addr or socket.getfqdn()
        self._node = NodeInfo(addr, os.getpid(), local_id, secrets.token_hex(3), 0, socket.gethostname())
        self._lock = threading.RLock()
        self._beat_lock = threading.Lock()
        self._beats = 0
        self._keepalive: _KeepAlive | None = None
        #: The fastest poll: FAST_POLL, or slower for big jobs so that the whole job's polling stays bounded.
        self._fast_poll = max(FAST_POLL, settings.max_nodes / AGGREGATE_READ_RATE)
        # Never poll slower than a sweep is due, so that death detection is not delayed by a slow poll.
        self._slow_poll = max(self._fast_poll, min(SLOW_POLL, settings.keep_alive_interval / 2))
        #: While a round forms the poll grows to this at most: 4 fast polls, but never beyond the floor of big jobs
        #: (4x the floor would leave a 4,096-node job 8 s behind the completing write).
        self._forming_poll = max(4 * FAST_POLL, self._fast_poll)
        self._folder_read_period = FOLDER_READ_EVERY * self._fast_poll
        #: Waiting nodes sweep (list every heartbeat) every interval/2, and for big jobs no more often than keeps
        #: the whole job under AGGREGATE_SWEEP_RATE listings per second (each lists N records).
        self._sweep_period = max(settings.keep_alive_interval / 2, settings.max_nodes / AGGREGATE_SWEEP_RATE)
        # A silence longer than a sweep period means this observer could not look; at most max_gap of it counts
        # against the others (kept below the timeout, so that a blind spell alone never causes a death).
        self._liveness = LivenessTracker(
            settings.liveness_timeout,
            min(
                max(settings.liveness_timeout / 2, settings.keep_alive_interval, 1.5 * self._sweep_period),
                0.9 * settings.liveness_timeout,
            ),
        )
        self._budget = _ReadBudget(READ_RATE, READ_BURST, clock, sleep)
        #: Request records judged so far: name -> (tag, request or None if invalid).
        self._request_cache: dict[str, tuple[str, JoinRequest | None]] = {}
        #: Watches that wake the poll early (local directories; see Store.change_watch), made on first use: key
        #: True is the folder's (join requests, completions), False the other waiting nodes' (completions).
        #: Only with the real sleep: an injected sleep (tests, simulation) keeps full control of time.
        self._watches: dict[bool, ChangeWatch | None] = {}
        self._watching = sleep is time.sleep
        #: The name of this node's current request record and how many requests it has made.
        self._request_name: str | None = None
        self._request_count = 0
        self._last_call_seen: dict[tuple[str, int, int], float] = {}
        #: The last round seen complete (epoch, round): a won write that completes another one announces it.
        self._complete_seen: tuple[str, int] | None = None
        self._cached: tuple[float, RendezvousState | None] | None = None
        self._verified = False
        #: Heartbeat tags whose signature was checked (only with a job secret): name -> (tag, valid).
        self._verified_beats: dict[str, tuple[str, bool]] = {}
        #: Storage operations made by this handler, by kind (benchmarks and tests read them).
        self.ops: dict[str, int] = {"read": 0, "cas": 0, "put": 0, "list": 0, "get": 0, "delete": 0}
        self._finalizer = weakref.finalize(self, RendezvousHandler._finalize, [None])

    @staticmethod
    def _finalize(holder: list[Any]) -> None:
        keepalive = holder[0]
        if keepalive is not None:
            keepalive.stop()

    # -- identity ------------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.settings.run_id

    @property
    def node_id(self) -> str:
        return self._node.node_id

    def get_run_id(self) -> str:
        return self.settings.run_id

    # -- storage helpers -----------------------------------------------------------------------------------

    def _where(self) -> str:
        return self.store.describe("document")

    def _read(self) -> tuple[RendezvousState | None, Snapshot | None]:
        self._budget.take()
        self.ops["read"] += 1
        snap = self.store.read()
        if snap is None:
            return None, None
        state = decode_state(snap.data, self._where())
        self._saw(state)
        return state, snap

    def _cas(self, new: RendezvousState, snap: Snapshot | None) -> tuple[bool, RendezvousState | None, Snapshot | None]:
        self.ops["cas"] += 1
        result = self.store.compare_and_set(encode_state(new), None if snap is None else snap.token)
        if result.snapshot is None:
            return result.won, None, None
        state = new if result.won else decode_state(result.snapshot.data, self._where())
        if result.won and state.complete and (state.epoch, state.round) != self._complete_seen:
            # This write completed the round (its base was a document where the round was not complete).
            self._announce(state)
        self._saw(state)
        return result.won, state, result.snapshot

    def _saw(self, state: RendezvousState) -> None:
        if state.complete:
            self._complete_seen = (state.epoch, state.round)

    def _beat(self) -> None:
        with self._beat_lock:
            self._beats += 1
            payload = b'{"n":%d}' % self._beats
            self.ops["put"] += 1
            self.store.put_record("hb", self.node_id, payload)

    def _list(self, kind: str) -> dict[str, str]:
        self._budget.take()
        self.ops["list"] += 1
        return self.store.list_records(kind)

    def _get(self, kind: str, name: str) -> bytes | None:
        self._budget.take()
        self.ops["get"] += 1
        return self.store.read_record(kind, name)

    def _heartbeat_tags(self) -> dict[str, str]:
        tags = self._list("hb")
        if not self.store.signed:
            return tags
        # With a job secret, only signed heartbeats count: a forged one must not keep a dead node alive.
        valid = {}
        for name, tag in tags.items():
            known = self._verified_beats.get(name)
            if known is None or known[0] != tag:
                try:
                    self._get("hb", name)
                    known = (tag, True)
                except RendezvousStateError as exc:
                    log.warning("ignoring heartbeat: %s", exc)
                    known = (tag, False)
                self._verified_beats[name] = known
            if known[1]:
                valid[name] = tag
        for stale in set(self._verified_beats) - set(tags):
            del self._verified_beats[stale]
        return valid

    def _requests(self) -> list[JoinRequest]:
        """Every pending-looking join request, from one listing.

        Inline names carry the request itself; a body record (a request too long for a name) is read once per
        change of its tag. A record that does not decode, or is not signed with the job's secret, is reported
        once and ignored: never act on a record we cannot trust.
        """
        tags = self._list("req")
        out = []
        for name, tag in tags.items():
            inline = name.startswith(INLINE_PREFIX)
            cached = self._request_cache.get(name)
            # An inline name is its own content: decoded once. A body record is read again when its tag changes.
            if cached is None or (not inline and cached[0] != tag):
                try:
                    if inline:
                        request = decode_request_name(name, self.store.name_mac)
                    else:
                        raw = self._get("req", name)
                        request = None if raw is None else decode_request(raw, f"join request {name!r}")
                except RendezvousStateError as exc:
                    log.warning("ignoring %s", exc)
                    request = None
                cached = (tag, request)
                self._request_cache[name] = cached
            if cached[1] is not None:
                out.append(cached[1])
        for stale in set(self._request_cache) - set(tags):
            del self._request_cache[stale]
        return out

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
            try:
                return self._next_rendezvous()
            except BaseException:
                # Like torch: no heartbeats unless joined. Others then see this node go within the timeout.
                self._stop_keepalive()
                raise

    def _start_keepalive(self) -> None:
        self._beat()
        if self._keepalive is None or not self._keepalive.thread.is_alive():
            self._keepalive = _KeepAlive(self, self.settings.keep_alive_interval)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, RendezvousHandler._finalize, [self._keepalive])
            self._keepalive.start()

    def _next_rendezvous(self) -> RendezvousInfo:
        settings = self.settings
        me = self.node_id
        start = self._clock()
        deadline = start + settings.join_timeout
        if not self._verified:
            self._retry(self.store.verify_conditions, deadline)
            self._verified = True
        self._retry(self._start_keepalive, deadline)
        state, snap = self._retry(self._read, deadline)
        state, snap = self._retry(lambda: self._reuse_if_finished(state, snap), deadline)
        leave_round = state.round if state is not None and me in state.participants else None
        self._node = replace(self._node, port=self._port_factory(self._node.addr))
        request = self._new_request(leave_round)
        # Watch before asking to join: a completion announced while this node folds or reads must still wake it.
        self._watch(False)
        self._retry(lambda: self._put_request(request), deadline)

        poll = self._fast_poll
        own_folds = 0  # how often this node folded its own request into the document
        next_own = start  # the first is immediate
        seen: tuple[str, int] | None = None  # (epoch, generation) last seen, and when it changed
        progress_at = start
        looked_at = start  # when this node last learnt the current document
        next_sweep = start + self._sweep_period
        was_spare = False
        was_folder = False
        backoff = _Backoff(self, "during join of")
        while True:
            now = self._clock()
            try:
                if state is None or snap is None:
                    # No document yet: create it with our own request (a create-if-absent CAS).
                    base = proto.new_state(settings.run_id, secrets.token_hex(8))
                    _, state, snap = self._cas(proto.fold_requests(base, [request], settings), None)
                    own_folds += 1
                    continue
                if (state.epoch, state.generation) != seen:
                    seen, progress_at = (state.epoch, state.generation), now
                mine = state.applied.get(me) == request.nonce
                if mine and me not in state.members() and not state.closed:
                    # Folded, then removed (others judged us dead while our storage was cut off): ask again,
                    # as torch's join op re-adds a node the sanitizer dropped.
                    request = self._new_request(None)
                    self._put_request(request)
                    self._beat()
                    own_folds, next_own, mine = 0, now, False
                if mine and state.complete and me in state.participants:
                    # A completed round is a fact even if someone closed the run right after: report it.
                    # Refresh the cache too: a read from before the round formed would still show this round's
                    # nodes as waiting, and an agent polling num_nodes_waiting would restart for nothing.
                    self._cached = (now, state)
                    return self._info(state)
                if state.closed:
                    self._stop_keepalive()
                    if me in state.redundancy_list:
                        raise RendezvousGracefulExitError(
                            f"rendezvous {settings.run_id!r} was closed while this node waited as a spare; "
                            "exiting normally"
                        )
                    raise RendezvousClosedError(
                        f"rendezvous {settings.run_id!r} is closed; start a new job (a finished run id is reused "
                        "once all its nodes are gone)"
                    )
                spare = me in state.redundancy_list
                if was_spare and not spare:
                    deadline = now + settings.join_timeout  # torch refreshes the deadline leaving the spare list
                was_spare = spare
                if not mine:
                    # A waiting member (the folder, see _is_folder) folds every pending request in one write. While
                    # a round forms, leave ours to it: the folder is then the only writer, and its writes win
                    # without a read first. Fold our own request ourselves when nobody folds (the first arrival;
                    # the document stood still for FOLD_GRACE: the folder may be stuck), and once when the round is
                    # complete (a newcomer to its wait list is seen by num_nodes_waiting at once, not at the
                    # folder's slow poll). Jittered back-off so that retries do not collide.
                    folder_at_work = self._has_folder(state) and now - progress_at < FOLD_GRACE
                    if now >= next_own and (not folder_at_work or (own_folds == 0 and state.complete)):
                        own_folds += 1
                        next_own = now + self._rng.uniform(0, min(1.0, 0.02 * 2**own_folds))
                        new = proto.fold_requests(state, [request], settings)
                        if new is not state:
                            _, state, snap = self._cas(new, snap)
                            continue
                elif me in state.participants and state.last_call is not None:
                    key = (state.epoch, state.round, state.last_call)
                    seen_at = self._last_call_seen.setdefault(key, now)
                    if now - seen_at >= settings.last_call_timeout:
                        new = proto.mark_complete(state, settings)
                        if new is not state:
                            _, state, snap = self._cas(new, snap)
                            continue
                if now >= next_sweep:
                    next_sweep = now + self._sweep_period
                    changed, state, snap = self._sweep(state, snap, now)
                    if changed or state is None:
                        continue
                if not spare and now > deadline:
                    self._rollback(state, snap)
                    raise RendezvousTimeoutError(
                        f"rendezvous {settings.run_id!r} did not complete within join_timeout="
                        f"{settings.join_timeout:g}s: {len(state.participants)} participant(s), "
                        f"min_nodes={settings.min_nodes}; check that the other nodes use the same endpoint and "
                        "run id, or raise join_timeout"
                    )
                folder = mine and self._is_folder(state)
                if folder and not was_folder:
                    # A node that just became the folder looks at once: requests may have waited for it since the
                    # previous folder's last fold. Its watch starts first, so that none arrives unseen in between.
                    self._watch(True)
                else:
                    self._wait(poll, folder)
                was_folder = folder
                before = state.generation
                if folder:
                    # The folder lists the requests at every poll (one read shows them all) and folds the new
                    # ones into the document as it last saw it: while a round forms it is the only writer, so
                    # that write wins without a read first (a lost one returns the current document, and the
                    # fold is made again on it). It reads the document itself only when it has not seen it for a
                    # few polls, to notice what others wrote (a last call that ended, a close): a read at every
                    # wake-up would spend its read budget while nodes arrive in a burst.
                    requests = self._requests()
                    if self._clock() - looked_at >= self._folder_read_period:
                        state, snap = self._read()
                        looked_at = self._clock()
                    if state is not None and snap is not None:
                        folded_on = snap
                        _, state, snap = self._fold(state, snap, requests)
                        if snap is not folded_on:  # a write, won or lost, brought the current document
                            looked_at = self._clock()
                else:
                    state, snap = self._read()
                    looked_at = self._clock()
                backoff.reset()
                if state is not None and state.generation != before:
                    poll = self._fast_poll
                elif state is not None and (state.complete or spare):
                    poll = min(self._slow_poll, poll * POLL_GROWTH)
                else:
                    # A forming round: stay responsive, since the last arrival completes it at any moment.
                    poll = min(self._forming_poll, poll * POLL_GROWTH)
            except StorageError as exc:
                backoff.failed(exc, deadline)
                # Our records are written; read again and go on (the loop re-folds if need be).
                with contextlib.suppress(StorageError):
                    state, snap = self._read()

    def _outage_budget(self) -> float:
        """How long storage may keep failing before a wait gives up: longer than others need to see us dead."""
        return max(2 * self.settings.liveness_timeout, MIN_OUTAGE)

    def _retry(self, fn: Callable[[], _T], deadline: float) -> _T:
        """Run ``fn``, retrying storage errors with jittered back-off (every write here is idempotent)."""
        backoff = _Backoff(self)
        while True:
            try:
                return fn()
            except StorageError as exc:
                backoff.failed(exc, deadline)

    def _wait(self, seconds: float, folder: bool = False) -> None:
        """Sleep one poll period, or less if this node's watch sees a change that concerns it.

        The folder wakes on a new join request; every waiting node on the announcement that a round completed:
        one wake per round, not one per write (waking every waiting node on every new generation is a thundering
        herd when the nodes outnumber the cores, as all nodes of a local-directory job share one host; measured
        N=32 on 2 cores: 0.17 s with that, 0.08 s without, 0.04 s with announcements).
        """
        watch = self._watch(folder)
        if watch is None:
            self._sleep(seconds)
        elif watch.wait(seconds) and folder:
            # Let a burst settle (nodes arriving together, folds in quick succession): one look then sees all of
            # it. (An announced completion has nothing to wait for.)
            self._sleep(WAKE_SETTLE)

    def _watch(self, folder: bool) -> ChangeWatch | None:
        """The folder's or the other waiting nodes' watch, made on first use; None where there is none."""
        if not self._watching:
            return None
        if folder not in self._watches:
            self._watches[folder] = None
            kinds = ("req", COMPLETE_KIND) if folder else (COMPLETE_KIND,)
            with contextlib.suppress(OSError, RendezvousError):
                self._watches[folder] = self.store.change_watch(kinds, document=False)
        return self._watches[folder]

    def _announce(self, state: RendezvousState) -> None:
        """Tell the waiting nodes on this host that the round completed, if they can sleep on a watch.

        One small record rewritten per round (a rename, which a watch sees): the nodes that are not folding sleep
        on it instead of on every new generation, and learn of completion within milliseconds, not at their
        next poll. Where the store offers no watch this writes nothing.
        """
        if self._watch(False) is None:
            return
        self.ops["put"] += 1
        with contextlib.suppress(StorageError):  # only a shortcut: the others still poll
            payload = b'{"epoch":"%s","round":%d}' % (state.epoch.encode(), state.round)
            self.store.put_record(COMPLETE_KIND, "round", payload)

    def _new_request(self, leave_round: int | None) -> JoinRequest:
        # Ordered nonces: a stale listing that still shows this node's previous request can never refold it.
        self._request_count += 1
        return JoinRequest(self._node, f"{self._request_count}.{secrets.token_hex(6)}", leave_round)

    def _put_request(self, request: JoinRequest) -> None:
        name = request_record_name(request, self.store.name_mac)
        self.ops["put"] += 1
        self.store.put_record("req", name, encode_request(request))
        previous, self._request_name = self._request_name, name
        if previous is not None and previous != name:
            # Best effort: a leftover is harmless (ordered nonces) and removed at shutdown or run reuse.
            with contextlib.suppress(StorageError):
                self.ops["delete"] += 1
                self.store.delete_record("req", previous)

    @staticmethod
    def _waiting(state: RendezvousState) -> list[str]:
        """Members still waiting for a round (everyone but the participants of a complete round)."""
        return [m for m in state.members() if not (state.complete and m in state.participants)]

    def _has_folder(self, state: RendezvousState) -> bool:
        return bool(self._waiting(state))

    def _is_folder(self, state: RendezvousState) -> bool:
        """Whether this node folds the others' requests: the waiting member whose request was folded first.

        The document keeps the order in which requests were folded, so every node names the same folder, and
        the role stays with one node while others arrive (were it the lowest node identity, each newcomer with a
        lower one would take it over, and learn of it only at its next poll).
        """
        waiting = set(self._waiting(state))
        first = next((node_id for node_id in state.applied if node_id in waiting), None)
        if first is None and waiting:
            first = min(waiting, key=lambda i: state.nodes[i])
        return first == self.node_id

    def _fold(
        self, state: RendezvousState, snap: Snapshot, requests: list[JoinRequest]
    ) -> tuple[bool, RendezvousState | None, Snapshot | None]:
        """Fold every pending request with one compare-and-set (none if nothing is pending).

        A lost write brings the current document: fold into that at once (a few times at most; the loop's next
        poll tries again), rather than wait a poll with every request still pending.
        """
        for _ in range(FOLD_ATTEMPTS):
            new = proto.fold_requests(state, requests, self.settings)
            if new is state:
                return False, state, snap
            won, got, got_snap = self._cas(new, snap)
            if won or got is None or got_snap is None:
                return won, got, got_snap
            state, snap = got, got_snap
        return False, state, snap

    def _sweep(
        self, state: RendezvousState, snap: Snapshot | None, now: float
    ) -> tuple[bool, RendezvousState | None, Snapshot | None]:
        members = state.members() - {self.node_id}
        tags = self._heartbeat_tags()
        now = self._clock()  # when we looked (the read budget may have made us wait)
        self._liveness.observe(tags, now, members)
        self._liveness.forget(members)
        dead = self._liveness.dead(members, now)
        if not dead:
            return False, state, snap
        log.info("removing node(s) without heartbeat for %.1fs: %s", self.settings.liveness_timeout, sorted(dead))
        new = proto.remove_nodes(state, dead, self.settings)
        return self._cas(new, snap)

    def _rollback(self, state: RendezvousState, snap: Snapshot | None) -> None:
        stop = self._clock() + ROLLBACK_WINDOW
        while self._clock() < stop and self.node_id in state.members():
            new = proto.remove_nodes(state, [self.node_id], self.settings)
            try:
                won, got, snap = self._cas(new, snap)
            except RendezvousError:
                return
            if won or got is None:
                return
            state = got

    def _reuse_if_finished(
        self, state: RendezvousState | None, snap: Snapshot | None
    ) -> tuple[RendezvousState | None, Snapshot | None]:
        """A closed run whose nodes are all gone starts afresh; a live closed run stays closed."""
        if state is None or not state.closed or self.node_id in state.members():
            return state, snap
        members = state.members()
        start = self._clock()
        while True:
            tags = self._heartbeat_tags()
            now = self._clock()
            self._liveness.observe(tags, now, members)
            gone = self._liveness.missing(tags, members) | self._liveness.dead(members, now)
            if gone >= members:
                break
            if now - start > self.settings.liveness_timeout + self.settings.keep_alive_interval:
                return state, snap  # someone of the old job is still alive: the run is really closed
            self._sleep(min(SLOW_POLL, self.settings.keep_alive_interval / 2))
            state, snap = self._read()
            if state is None or not state.closed:
                return state, snap
            members = state.members()
        log.info("run %r was closed and all its nodes are gone: starting it afresh", self.run_id)
        for name in self.store.list_records("req"):
            if request_owner(name) in members:
                with contextlib.suppress(StorageError):
                    self.store.delete_record("req", name)
        _, state, snap = self._cas(proto.restart(state, secrets.token_hex(8)), snap)
        if state is not None and state.closed:
            state, snap = self._read()
        return state, snap

    def _info(self, state: RendezvousState) -> RendezvousInfo:
        # The roster fixed at completion is the round's world, even if some participants already left it.
        assert state.master is not None
        return RendezvousInfo(
            round=state.round,
            rank=state.participants[self.node_id],
            world_size=len(state.roster),
            master_addr=state.master[0],
            master_port=state.master[1],
            participants=state.roster,
            run_id=self.run_id,
        )

    def _cached_state(self) -> RendezvousState | None:
        now = self._clock()
        if self._cached is None or now - self._cached[0] > READ_CACHE:
            self._cached = (now, self._retry(self._read, now + self.settings.heartbeat_timeout)[0])
        return self._cached[1]

    def num_nodes_waiting(self) -> int:
        """Nodes waiting to join the next round (not counting spares). Answers from a read at most 1 s old."""
        with self._lock:
            state = self._cached_state()
            return 0 if state is None else len(state.wait_list)

    def is_closed(self) -> bool:
        """Whether the run is closed (from a read at most 1 s old)."""
        with self._lock:
            state = self._cached_state()
            return state is not None and state.closed

    def set_closed(self) -> None:
        """Close the run for every node. Idempotent.

        :raises RendezvousTimeoutError: it could not be written within ``close_timeout``.
        """
        with self._lock:
            deadline = self._clock() + self.settings.close_timeout
            delay = FAST_POLL
            while True:
                state, snap = self._retry(self._read, deadline)
                if state is None:
                    state = proto.new_state(self.run_id, secrets.token_hex(8))
                if state.closed:
                    self._cached = None
                    return
                try:
                    won, _, _ = self._cas(proto.close(state), snap)
                except StorageError:
                    if self._clock() > deadline:
                        raise
                    won = False  # maybe written, maybe not: the next read tells (closing is idempotent)
                if won:
                    self._cached = None
                    return
                if self._clock() > deadline:
                    raise RendezvousTimeoutError(
                        f"could not close rendezvous {self.run_id!r} within close_timeout="
                        f"{self.settings.close_timeout:g}s"
                    )
                self._sleep(delay * self._rng.uniform(0.5, 1.5))
                delay = min(SLOW_POLL, delay * 2)

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.stop()
            self._keepalive = None

    def shutdown(self) -> bool:
        """Stop the keep-alive, close the run (as torch does) and remove this node's records.

        Returns True on success; False if the run could not be closed (the error is logged).
        """
        self._stop_keepalive()
        for watch in self._watches.values():
            if watch is not None:
                watch.close()
        self._watches.clear()
        try:
            self.set_closed()
        except RendezvousError as exc:
            log.warning("shutdown of %s could not close rendezvous %r: %s", self.node_id, self.run_id, exc)
            return False
        # Our records are the proof that we are alive: remove them so that a new job can reuse the run id now.
        records = [("hb", self.node_id)]
        if self._request_name is not None:
            records.append(("req", self._request_name))
        for kind, name in records:
            with contextlib.suppress(RendezvousError):
                self.ops["delete"] += 1
                self.store.delete_record(kind, name)
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
    join_timeout: float = 600,
    last_call_timeout: float = 30,
    close_timeout: float = 30,
    keep_alive_interval: float = 5,
    keep_alive_max_attempt: int = 3,
    heartbeat_timeout: float = 5,
    secret: bytes | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    port_factory: Callable[[str], int] | None = None,
) -> RendezvousHandler:
    """Create a rendezvous handler for ``run_id`` at ``endpoint`` (see :func:`fsrdzv.open_store`).

    Timeouts are seconds (floats allowed) with torch's defaults. ``secret`` (or the file named by the environment
    variable ``FSRDZV_SECRET_FILE``) turns on HMAC authentication of every document and record. ``clock`` and
    ``sleep`` are injectable (tests, simulation); ``port_factory(addr)`` picks the master port this node offers.

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
    )
    if secret is None:
        secret = _secret_from_env()
    store = open_store(endpoint, run_id, storage_options=storage_options, secret=secret)
    return RendezvousHandler(
        store, settings, local_addr=local_addr, clock=clock, sleep=sleep, port_factory=port_factory
    )


def read_secret_file(path: str) -> bytes:
    """Read a job secret file (whitespace stripped). Raises ConfigurationError if unusable."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the secret file {path!r}: {exc.strerror}") from None
    if len(secret) < 16:
        raise ConfigurationError(f"the secret in {path!r} is shorter than 16 bytes; use a long random value")
    return secret


def _secret_from_env() -> bytes | None:
    path = os.environ.get("FSRDZV_SECRET_FILE")
    return read_secret_file(path) if path else None
