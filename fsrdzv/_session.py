"""Budgeted, counted, decoded I/O on one run's store: the only path by which fsrdzv reads or writes a document.

A :class:`Session` belongs to one node (or one administrative tool). Every read of the store takes a token of
the node's read budget (:class:`ReadBudget`), every operation is counted in :attr:`Session.ops`, documents are
decoded once per distinct content (:class:`DocumentCache`), and a won write that completes a round is announced
to the nodes that sleep on a watch. The request records (:class:`RequestBook`) and, with a job secret, the
signature check of heartbeat records (:class:`BeatFilter`) live here too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Final, Literal

from ._errors import RendezvousError, StorageError
from ._protocol import stamp_lead
from ._state import (
    RendezvousState,
    decode_state,
    encode_state,
)
from ._store import NOT_MODIFIED, ChangeWatch, Snapshot, Store

__all__ = [
    "COMPLETE_KIND",
    "READ_BURST",
    "READ_RATE",
    "DocumentCache",
    "ReadBudget",
    "Session",
    "WatchRole",
]

log = logging.getLogger("fsrdzv")

#: Read budget of one node (token bucket): at most READ_RATE + READ_BURST reads of the store in any second.
READ_RATE: Final = 12.0
READ_BURST: Final = 8.0
#: Record kind of the announcement that a round completed (see :meth:`Session.announce`).
COMPLETE_KIND: Final = "done"
#: After a watch wakes the folder, it waits this long before reading, so that a burst of changes costs one read.
WAKE_SETTLE: Final = 0.01

#: Who sleeps on a watch: the folder wakes on join requests and completions, every other waiting node on
#: completions only.
WatchRole = Literal["folder", "waiter"]
_WATCH_KINDS: Final[dict[str, tuple[str, ...]]] = {"folder": ("req", COMPLETE_KIND), "waiter": (COMPLETE_KIND,)}

Clock = Callable[[], float]
Sleep = Callable[[float], None]
#: The result of a compare-and-set: (won, the current document, its snapshot); both None when the store did not
#: say what is there now.
CasOutcome = tuple[bool, RendezvousState | None, Snapshot | None]


class ReadBudget:
    """A token bucket over one node's reads: at most ``rate + burst`` reads in any one-second window.

    Every read of the store while joining takes a token, so the per-node read rate holds by construction
    whatever the node's role (joiner, folder, sweeper), with the clock and sleep of the node.
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


class DocumentCache:
    """Decoded documents by their bytes: an unchanged document is not parsed again.

    States are immutable, so identical bytes may share one decoded value; sessions may share one cache (the
    simulation does, so that thousands of nodes polling one large document parse it once per change).
    """

    def __init__(self, size: int = 1) -> None:
        self._size = size
        self._states: OrderedDict[bytes, RendezvousState] = OrderedDict()

    def decode(self, data: bytes, where: str) -> RendezvousState:
        state = self._states.get(data)
        if state is None:
            state = decode_state(data, where)
            if len(self._states) >= self._size:
                self._states.popitem(last=False)
            self._states[data] = state
        return state


class Session:
    """One node's (or one tool's) budgeted, counted and decoded access to a run's store.

    :param watching: make change watches where the store offers them (only with the real sleep: an injected
        sleep keeps full control of time). A session that does not watch never announces completions either.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        watching: bool = False,
        documents: DocumentCache | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.sleep = sleep
        self._budget = ReadBudget(READ_RATE, READ_BURST, clock, sleep)
        self._documents = documents or DocumentCache()
        self._watching = watching
        self._watches: dict[WatchRole, ChangeWatch | None] = {}
        #: The last round seen complete (epoch, round): a won write that completes another one announces it.
        self._complete_seen: tuple[str, int] | None = None
        #: Storage operations made through this session, by kind (benchmarks and tests read them); ``unchanged``
        #: counts the reads (among ``read``) that the store answered NOT_MODIFIED; ``tag``, records' tags.
        self.ops: dict[str, int] = dict.fromkeys(
            ("read", "cas", "cas_lost", "put", "list", "get", "tag", "delete", "unchanged"), 0
        )
        #: The newest document this session read or wrote, and its snapshot (the token of a conditional read).
        self.last: tuple[RendezvousState | None, Snapshot | None] = (None, None)
        #: A moving average of the document reads' round trips (s; None before the first). Until the first read, a
        #: listing's round trip stands in: a fresh node lists the requests before it reads (see ``_join``).
        self.read_latency: float | None = None
        #: This node's ``RendezvousState.lead`` (its id and heartbeat fields): every write in which this node is
        #: rank 0, or would be at completion, carries it (see :func:`fsrdzv._protocol.stamp_lead`). None: an
        #: administrative tool.
        self.lead: Mapping[str, object] | None = None

    def where(self) -> str:
        return self.store.describe("document")

    # -- the document --------------------------------------------------------------------------------------

    def read(self) -> tuple[RendezvousState | None, Snapshot | None]:
        """The document: a conditional read against the newest one this session saw (:attr:`last`), if any (an
        unchanged document costs no body on the object stores, no hash on a directory)."""
        if self.last[1] is not None:
            return self.read_if_changed()
        self._budget.take()
        self.ops["read"] += 1
        started = self.clock()
        snap = self.store.read()
        self._timed(self.clock() - started)
        if snap is None:
            self.last = (None, None)
            return None, None
        state = self._documents.decode(snap.data, self.where())
        self._saw(state)
        self.last = (state, snap)
        return state, snap

    def read_if_changed(self) -> tuple[RendezvousState | None, Snapshot | None]:
        """The document, from a conditional read against the newest one this session saw (:attr:`last`)."""
        known = self.last[1]
        if known is None:
            return self.read()
        self._budget.take()
        self.ops["read"] += 1
        started = self.clock()
        got = self.store.read_if_changed(known.token)
        self._timed(self.clock() - started)
        if got is NOT_MODIFIED:
            self.ops["unchanged"] += 1
            return self.last
        if got is None:
            self.last = (None, None)
            return self.last
        state = self._documents.decode(got.data, self.where())
        self._saw(state)
        self.last = (state, got)
        return self.last

    def _timed(self, seconds: float) -> None:
        previous = self.read_latency
        self.read_latency = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def cas(self, new: RendezvousState, snap: Snapshot | None) -> CasOutcome:
        """Write ``new`` if the document is still ``snap`` (None: create it), announcing a completed round."""
        self.ops["cas"] += 1
        new = stamp_lead(new, self.lead)
        result = self.store.compare_and_set(encode_state(new), None if snap is None else snap.token)
        if not result.won:
            self.ops["cas_lost"] += 1
        if result.snapshot is None:
            return result.won, None, None
        state = new if result.won else self._documents.decode(result.snapshot.data, self.where())
        if result.won and state.complete and (state.epoch, state.round) != self._complete_seen:
            # This write completed the round (its base was a document where the round was not complete).
            self.announce(state)
        self._saw(state)
        self.last = (state, result.snapshot)
        return result.won, state, result.snapshot

    def reset(self, new: RendezvousState) -> Snapshot:
        """Replace the document whatever it holds and delete every record (``fsrdzv reset``)."""
        self.ops["cas"] += 1
        return self.store.reset(encode_state(new))

    def _saw(self, state: RendezvousState) -> None:
        if state.complete:
            self._complete_seen = (state.epoch, state.round)

    # -- records -------------------------------------------------------------------------------------------

    def list(self, kind: str) -> dict[str, str]:
        self._budget.take()
        self.ops["list"] += 1
        if self.read_latency is not None:
            return self.store.list_records(kind)
        started = self.clock()
        listed = self.store.list_records(kind)
        self._timed(self.clock() - started)
        return listed

    def get(self, kind: str, name: str) -> bytes | None:
        self._budget.take()
        self.ops["get"] += 1
        return self.store.read_record(kind, name)

    def tag(self, kind: str, name: str) -> str | None:
        """A record's tag without its payload (see :meth:`Store.record_tag`)."""
        self._budget.take()
        self.ops["tag"] += 1
        return self.store.record_tag(kind, name)

    def get_unbudgeted(self, kind: str, name: str) -> bytes | None:
        """A record read outside a join's polling (the launcher's monitor has its own period)."""
        self.ops["get"] += 1
        return self.store.read_record(kind, name)

    def put(self, kind: str, name: str, data: bytes) -> None:
        self.ops["put"] += 1
        self.store.put_record(kind, name, data)

    def delete(self, kind: str, name: str) -> None:
        self.ops["delete"] += 1
        self.store.delete_record(kind, name)

    def discard(self, kind: str, name: str) -> None:
        """Best-effort delete: a leftover record is harmless (ordered nonces; removed at shutdown or reuse)."""
        with contextlib.suppress(StorageError):
            self.delete(kind, name)

    # -- watches and the completion announcement -----------------------------------------------------------

    def watch(self, role: WatchRole) -> ChangeWatch | None:
        """The watch of ``role``, made on first use; None where there is none."""
        if not self._watching:
            return None
        if role not in self._watches:
            self._watches[role] = None
            with contextlib.suppress(OSError, RendezvousError):
                self._watches[role] = self.store.change_watch(_WATCH_KINDS[role], document=False)
        return self._watches[role]

    def wait(self, seconds: float, role: WatchRole) -> None:
        """Sleep ``seconds``, or less if the watch of ``role`` sees a change that concerns it."""
        watch = self.watch(role)
        if watch is None:
            self.sleep(seconds)
        elif watch.wait(seconds) and role == "folder":
            # A burst (nodes arriving together) settles first, so that one look sees all of it; an announced
            # completion has nothing to wait for.
            self.sleep(WAKE_SETTLE)

    def announce(self, state: RendezvousState) -> None:
        """Tell the waiting nodes on this host that the round completed, if they can sleep on a watch.

        One small record rewritten per round (a rename, which a watch sees): the nodes that are not folding sleep
        on it instead of on every new generation (a thundering herd when nodes outnumber cores), and learn of
        completion at once, not at their next poll. Where the store offers no watch this writes nothing.
        """
        if self.watch("waiter") is None:
            return
        with contextlib.suppress(StorageError):  # only a shortcut: the others still poll
            self.put(COMPLETE_KIND, "round", b'{"epoch":"%s","round":%d}' % (state.epoch.encode(), state.round))

    def close_watches(self) -> None:
        for watch in self._watches.values():
            if watch is not None:
                watch.close()
        self._watches.clear()
