"""What ``num_nodes_waiting`` and ``is_closed`` answer from between joins: cheap reads of a steady document.

In steady state (a round formed, the workers run) the document does not change, yet torchrun's agent asks
``num_nodes_waiting`` ten times a second on every node. Those questions are answered from the document as last
read, refreshed by a *conditional* read (``If-None-Match`` on S3 and Azure, ``ifGenerationNotMatch`` on GCS, the
state file's header on a directory): an unchanged document costs one request without a body. The refresh period
keeps the one document under a fifth of the job's size in requests per second, and grows with the job beyond
``STEADY_READ_RATE`` requests per second in all.
"""

from __future__ import annotations

import math
import random
from typing import Final

from ._session import Session
from ._state import RendezvousState

__all__ = ["STEADY_POLL", "STEADY_READ_RATE", "SteadyReads", "steady_period"]

#: ``num_nodes_waiting`` / ``is_closed`` answer from a conditional read of about this age at most (s): the document
#: is asked at most members / STEADY_POLL times a second (a fifth of the job), and an unchanged one answers
#: without a body.
STEADY_POLL: Final = 5.0
#: ... and a job's steady reads of the document stay under this many per second at any size (10,000 nodes: 10 s).
STEADY_READ_RATE: Final = 1000.0
#: Each period is drawn from (1 +/- this) x the period, so that the nodes' reads stay spread over it.
STEADY_JITTER: Final = 0.1


def steady_period(members: int) -> float:
    """The mean period of the steady reads of a job of ``members`` nodes (s)."""
    return max(STEADY_POLL, members / STEADY_READ_RATE)


class SteadyReads:
    """The document as ``num_nodes_waiting`` and ``is_closed`` see it between joins.

    Refreshed by a conditional read (an unchanged document costs a request without a body) once per
    :func:`steady_period`, jittered; the first period after a join is drawn from all of it, so that the nodes of
    a round, which finish their joins together, spread their reads over the period instead of asking together.
    """

    def __init__(self, session: Session, rng: random.Random) -> None:
        self._session = session
        self._rng = rng
        #: The document as last read (None: there is none).
        self.state: RendezvousState | None = None
        self._due = -math.inf

    def due(self, now: float) -> bool:
        return now >= self._due

    def hold(self, state: RendezvousState) -> None:
        """A join returned ``state``: answer from it until a read, a random part of a period from now, is due."""
        self.state = state
        self._due = self._session.clock() + self._period() * self._rng.uniform(STEADY_JITTER, 1.0)

    def forget(self) -> None:
        """The next question reads (this node just changed the document)."""
        self._due = -math.inf

    def refresh(self) -> RendezvousState | None:
        self.state, _ = self._session.read_if_changed()
        self._due = self._session.clock() + self._period() * self._rng.uniform(1 - STEADY_JITTER, 1 + STEADY_JITTER)
        return self.state

    def _period(self) -> float:
        return steady_period(0 if self.state is None else len(self.state.members()))
