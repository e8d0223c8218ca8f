"""How often a node looks: the poll and sweep periods of a join, fixed by the settings, and the budgets of
reads and outages they imply. Pure values, no I/O (the decisions that use them are in ``_policy``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ._liveness import LivenessTracker
from ._settings import Settings

#: Poll period while a round is forming or anything just changed (s), so the last arrival's completing write is
#: seen within ~60 ms (where no watch wakes the node sooner; the read budget caps it at 12 reads/s).
FAST_POLL: Final = 0.06
#: Right after a change a node polls again after this many of its own read round trips (but at least
#: QUICK_POLL_FLOOR s, at most FAST_POLL): the next change (the folder's fold, the completing write) is a round
#: trip or two away.
QUICK_POLL_TRIPS: Final = 3.0
QUICK_POLL_FLOOR: Final = 0.01
#: A node that found no document and left its creation to another (see :func:`creator`) looks again after this
#: many of its read round trips (the creator writes one after its listing); it creates it itself after CREATE_GRACE s.
CREATE_WAIT_TRIPS: Final = 1.5
CREATE_GRACE: Final = 1.0
#: Polls of the whole job stay under this many reads per second: the poll period is at least max_nodes / this
#: (a 1,000-node job polls every 0.5 s, well under S3's 5,500 GETs/s per prefix and an NFS server's capacity).
AGGREGATE_READ_RATE: Final = 2000.0
#: Heartbeat sweeps of the whole job stay under this many listings per second (a 4,096-node job sweeps every 8 s).
AGGREGATE_SWEEP_RATE: Final = 500.0
#: The folder reads the document when it has not seen it for this many fast polls; in between it folds into what
#: it last saw.
FOLDER_READ_EVERY: Final = 4
#: A heartbeat that failed is retried after about this long (s; at most the keep-alive interval), not a full interval.
BEAT_RETRY: Final = 0.5
#: Poll period once nothing has changed for a while (s).
SLOW_POLL: Final = 1.0
#: Growth factor of the poll period while nothing changes.
POLL_GROWTH: Final = 1.3
#: How long ``num_nodes_waiting`` / ``is_closed`` answers from the last read (torch: 1 s).
READ_CACHE: Final = 1.0
#: A waiting node rides out a storage outage for at least this long (s), and at least twice the liveness
#: timeout, before it gives up (unless the join deadline comes first).
MIN_OUTAGE: Final = 10.0


def outage_budget(settings: Settings) -> float:
    """How long storage may keep failing before a wait gives up: longer than others need to see this node dead."""
    return max(2 * settings.liveness_timeout, MIN_OUTAGE)


# -- poll periods ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Periods:
    """The periods one node polls and sweeps at, fixed by the settings (s)."""

    #: The fastest poll: FAST_POLL, or slower for big jobs so that the whole job's polling stays bounded.
    fast: float
    #: The poll once nothing changes, never slower than a sweep is due (death detection must not wait on a poll).
    slow: float
    #: While a round forms the poll grows to this at most: 4 fast polls, but never beyond the floor of big jobs
    #: (4x the floor would leave a 4,096-node job 8 s behind the completing write).
    forming: float
    #: The folder reads the document itself when it has not seen it for this long.
    folder_read: float
    #: Waiting nodes sweep (list every heartbeat) every interval/2, and for big jobs no more often than keeps the
    #: whole job under AGGREGATE_SWEEP_RATE listings per second (each lists N records).
    sweep: float
    #: The poll floor of big jobs (max_nodes / AGGREGATE_READ_RATE).
    floor: float = 0.0

    @classmethod
    def of(cls, settings: Settings) -> Periods:
        fast = max(FAST_POLL, settings.max_nodes / AGGREGATE_READ_RATE)
        return cls(
            fast=fast,
            slow=max(fast, min(SLOW_POLL, settings.keep_alive_interval / 2)),
            forming=max(4 * FAST_POLL, fast),
            folder_read=FOLDER_READ_EVERY * fast,
            sweep=max(settings.keep_alive_interval / 2, settings.max_nodes / AGGREGATE_SWEEP_RATE),
            floor=settings.max_nodes / AGGREGATE_READ_RATE,
        )

    def quick(self, latency: float | None) -> float:
        """The poll right after a change: ``fast``, or a few round trips where the store answers much faster
        than FAST_POLL assumes (an emulator, a LAN object store), never under the big jobs' floor."""
        if latency is None:
            return self.fast
        return max(self.floor, QUICK_POLL_FLOOR, min(self.fast, QUICK_POLL_TRIPS * latency))

    def creator_wait(self, latency: float | None) -> float:
        """How long a node that left the document's creation to another waits before it looks again."""
        return max(self.floor, QUICK_POLL_FLOOR, min(self.fast, CREATE_WAIT_TRIPS * (latency or self.fast)))

    def creator_overdue(self, waited: float) -> bool:
        """Whether a node that left the creation to another waited long enough to create the document itself."""
        return waited >= max(CREATE_GRACE, FOLDER_READ_EVERY * self.fast)

    def first_sweep(self, settings: Settings, leave_round: int | None, draw: float) -> float:
        """Seconds from the start of a join to its first sweep, for a ``draw`` in [0, 1). A fresh join has nobody
        to time yet: a sweep period. A survivor of a round (``leave_round``) starts timing its dead peers at once,
        unless the job's sweeps are limited by AGGREGATE_SWEEP_RATE: then spread over a sweep period, so that N
        rejoining nodes do not list N records each at the same time."""
        if leave_round is None:
            return self.sweep
        return self.sweep * draw if self.sweep > settings.keep_alive_interval / 2 else 0.0

    def tracker(self, settings: Settings) -> LivenessTracker:
        """A joining node's liveness memory (see ``LivenessTracker``; ``fresh_credit``)."""
        return LivenessTracker(settings.liveness_timeout, self.liveness_max_gap(settings), fresh_credit(settings))

    def liveness_max_gap(self, settings: Settings) -> float:
        """How much of an observer's own blind spell counts against the others (see ``LivenessTracker``): more
        than a sweep period, kept below the timeout so that a blind spell alone never causes a death."""
        timeout = settings.liveness_timeout
        return min(max(timeout / 2, settings.keep_alive_interval, 1.5 * self.sweep), 0.9 * timeout)

    def next_poll(self, poll: float, *, changed: bool, idle: bool, latency: float | None = None) -> float:
        """The poll after one that saw the document ``changed`` or not; ``idle``: the round is complete or this
        node is a spare (nothing is about to happen), else a forming round stays responsive. ``latency``: this
        node's read round trip (see :meth:`quick`)."""
        if changed:
            return self.quick(latency)
        return min(self.slow if idle else self.forming, poll * POLL_GROWTH)

    def folder_read_due(self, looked_at: float, now: float) -> bool:
        return now - looked_at >= self.folder_read


def fresh_credit(settings: Settings) -> float:
    """How old a heartbeat record this node sees for the first time counts as (see ``LivenessTracker``): half a
    keep-alive interval, the middle of the ages a live node's record has, so that a survivor that starts watching
    when its round broke calls the dead node dead when torch's timestamps would on average, not a full timeout
    after it started to look (a live node is still given timeout - interval / 2 of silence at least)."""
    return settings.keep_alive_interval / 2
