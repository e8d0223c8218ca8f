"""The decisions of a join, as pure functions of what one node sees.

No I/O and no clock reads here: the executor (``_join``) builds a frozen :class:`JoinView` from the document it
holds and its own clock readings, :func:`decide` names the next :class:`Action`, and the executor carries it out.
"""

from __future__ import annotations

from typing import Final

from ._settings import Settings

#: Poll period while a round is forming or anything just changed (s), so the last arrival's completing write is
#: seen within ~60 ms (where no watch wakes the node sooner; the read budget caps it at 12 reads/s).
FAST_POLL: Final = 0.06
#: Polls of the whole job stay under this many reads per second: the poll period is at least max_nodes / this
#: (a 1,000-node job polls every 0.5 s, well under S3's 5,500 GETs/s per prefix and an NFS server's capacity).
AGGREGATE_READ_RATE: Final = 2000.0
#: Heartbeat sweeps of the whole job stay under this many listings per second (a 4,096-node job sweeps every 8 s).
AGGREGATE_SWEEP_RATE: Final = 500.0
#: A joiner whose request was not folded folds it itself once the document has not changed for this long (the
#: folder may be stuck; a dead one is removed by the liveness sweep after the liveness timeout).
FOLD_GRACE: Final = 5.0
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


def outage_budget(settings: Settings) -> float:
    """How long storage may keep failing before a wait gives up: longer than others need to see this node dead."""
    return max(2 * settings.liveness_timeout, MIN_OUTAGE)
