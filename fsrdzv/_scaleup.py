"""Scale-up only at safe points: the agents' side of ``scale_up_at=safe_point`` (the workers' side is
:func:`fsrdzv.safe_point`).

torch's agent restarts every worker as soon as ``num_nodes_waiting() > 0``, which throws away the work since the
last checkpoint each time a node arrives. With ``scale_up_at=safe_point`` each agent's :class:`ScaleUpGate`
answers 0 for waiting newcomers until every participant of the current round has marked a safe point since this
agent first saw a newcomer waiting, or ``scale_up_max_delay`` seconds have passed since then. A lost participant
(it left the round to re-join after a failure, or was removed as dead) is never deferred: the round re-forms.

Skew-free, like liveness: a safe point is a *change* of a participant's ``sp`` record tag after this observer's
first look (:class:`~fsrdzv._liveness.LivenessTracker`'s rule), and the delay runs on this host's monotonic clock.

Workers learn that a safe point is wanted from a node-local flag file (``FSRDZV_SAFE_POINT_FILE``) that the gate
creates while it defers, so :func:`fsrdzv.safe_point` costs one ``stat`` and writes nothing in steady state. The
deferring round's rank 0 writes one ``spgate`` record per deferral, which ``fsrdzv status`` shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ._errors import ConfigurationError, RendezvousError
from ._session import Session
from ._state import RendezvousState

__all__ = [
    "DEFAULT_MAX_DELAY",
    "GATE_KIND",
    "LOOK_INTERVAL",
    "SAFE_POINT_KIND",
    "SCALE_UP_AT",
    "ScaleUpGate",
    "ScaleUpPolicy",
]

# Deferrals and admissions are what a node waits for: shown by fsrdzv run like its own progress.
log = logging.getLogger("fsrdzv.progress")

#: The values of ``scale_up_at``: torch's behaviour, and waiting for a safe point.
SCALE_UP_AT: Final = ("any_time", "safe_point")
#: Default of ``scale_up_max_delay`` (s).
DEFAULT_MAX_DELAY: Final = 1800.0
#: Record kinds: a node's safe points (written by its workers), a deferral (written by the round's rank 0).
SAFE_POINT_KIND: Final = "sp"
GATE_KIND: Final = "spgate"
#: While deferring, the safe-point records are listed at most this often (s).
LOOK_INTERVAL: Final = 1.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class ScaleUpPolicy:
    """When waiting newcomers may make the current round re-form."""

    at: str = "any_time"
    max_delay: float = DEFAULT_MAX_DELAY

    @property
    def deferred(self) -> bool:
        return self.at == "safe_point"

    @classmethod
    def parse(
        cls, at: object = "any_time", max_delay: object = DEFAULT_MAX_DELAY, *, source: str = ""
    ) -> ScaleUpPolicy:
        """Validate ``scale_up_at`` and ``scale_up_max_delay`` (seconds, >= 0; 0 admits at once).

        :raises ConfigurationError: naming the key, the value and what to write instead.
        """
        where = f"invalid {source} value " if source else ""
        text = at.strip() if isinstance(at, str) else at
        if text not in SCALE_UP_AT:
            raise ConfigurationError(f"{where}scale_up_at={at!r}: expected any_time (torch's) or safe_point")
        try:
            delay = float(max_delay)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            delay = math.nan
        if isinstance(max_delay, bool) or not math.isfinite(delay) or delay < 0:
            raise ConfigurationError(
                f"{where}scale_up_max_delay={max_delay!r}: expected a number of seconds >= 0 (default 1800)"
            )
        return cls(str(text), delay)


@dataclass
class _Deferral:
    """One episode: newcomers wait while the round ``key`` runs."""

    key: tuple[str, int]
    members: frozenset[str]
    since: float
    wall_since: float
    baseline: dict[str, str]
    next_look: float
    admitted: bool = False


class _Flag:
    """The node-local file whose existence tells this node's workers that a safe point is wanted."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="fsrdzv-sp-")
        self.path = os.path.join(self._dir, "wanted")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)

    def set(self, wanted: bool) -> None:
        with contextlib.suppress(OSError):
            if wanted:
                with open(self.path, "w"):
                    pass
            else:
                os.unlink(self.path)

    def close(self) -> None:
        self._cleanup()


class ScaleUpGate:
    """One agent's judgement of whether waiting newcomers are reported now (see the module docstring)."""

    def __init__(self, policy: ScaleUpPolicy, session: Session, node_id: str, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._session = session
        self._node_id = node_id
        self._clock = clock
        self._deferral: _Deferral | None = None
        self._flag = _Flag() if policy.deferred else None
        self._gate_written = False

    @property
    def flag_path(self) -> str | None:
        """The file this node's workers check (``FSRDZV_SAFE_POINT_FILE``), or None without ``safe_point``."""
        return None if self._flag is None else self._flag.path

    @property
    def deferring(self) -> bool:
        """Whether newcomers are being held back right now."""
        return self._deferral is not None and not self._deferral.admitted

    def waiting(self, state: RendezvousState | None) -> int:
        """The number of waiting nodes to report for ``state``: ``len(state.wait_list)``, or 0 while deferred."""
        if state is None:
            return 0
        waiting = len(state.wait_list)
        if not self.policy.deferred or not waiting or not state.complete or self._lost(state):
            self._end()
            return waiting
        now = self._clock()
        deferral = self._deferral
        if deferral is None or deferral.key != (state.epoch, state.round):
            deferral = self._start(state, now)
        if deferral.admitted:
            return waiting
        if now - deferral.since >= self.policy.max_delay:
            return self._admit(deferral, f"no safe point within scale_up_max_delay={self.policy.max_delay:g}s", waiting)
        if now >= deferral.next_look:
            deferral.next_look = now + LOOK_INTERVAL
            tags = self._tags()
            if tags is not None and all(
                tags.get(n, deferral.baseline.get(n)) != deferral.baseline.get(n) for n in deferral.members
            ):
                return self._admit(deferral, "every participant marked a safe point", waiting)
        return 0

    def _lost(self, state: RendezvousState) -> bool:
        # Fewer participants than the round started with: one left to re-join (a failure) or was removed (dead).
        if len(state.participants) < len(state.roster):
            return True
        deferral = self._deferral
        return (
            deferral is not None
            and deferral.key == (state.epoch, state.round)
            and (set(state.participants) != deferral.members)
        )

    def _tags(self) -> dict[str, str] | None:
        try:
            return self._session.list(SAFE_POINT_KIND)
        except RendezvousError as exc:
            log.warning("cannot list safe points (will retry): %s", exc)
            return None

    def _start(self, state: RendezvousState, now: float) -> _Deferral:
        self._end()
        deferral = _Deferral(
            key=(state.epoch, state.round),
            members=frozenset(state.participants),
            since=now,
            wall_since=time.time(),
            baseline=self._tags() or {},
            next_look=now + LOOK_INTERVAL,
        )
        self._deferral = deferral
        if self._flag is not None:
            self._flag.set(True)
        log.info(
            "scale_up_at=safe_point: %d newcomer(s) wait for a safe point of every participant (at most %gs)",
            len(state.wait_list),
            self.policy.max_delay,
        )
        if state.participants.get(self._node_id) == 0:
            self._write_gate(state, deferral)
        return deferral

    def _write_gate(self, state: RendezvousState, deferral: _Deferral) -> None:
        body = {
            "round": state.round,
            "epoch": state.epoch,
            "newcomers": sorted(state.wait_list),
            "since": round(deferral.wall_since, 3),
            "max_delay": self.policy.max_delay,
        }
        try:
            self._session.put(GATE_KIND, self._node_id, json.dumps(body).encode())
            self._gate_written = True
        except RendezvousError as exc:  # only what status shows
            log.warning("cannot record the deferral for fsrdzv status: %s", exc)

    def _admit(self, deferral: _Deferral, why: str, waiting: int) -> int:
        log.info("admitting %d newcomer(s) after %.1fs: %s", waiting, self._clock() - deferral.since, why)
        deferral.admitted = True
        self._clear()
        return waiting

    def _end(self) -> None:
        if self._deferral is not None:
            self._deferral = None
            self._clear()

    def _clear(self) -> None:
        if self._flag is not None:
            self._flag.set(False)
        if self._gate_written:
            self._gate_written = False
            self._session.discard(GATE_KIND, self._node_id)

    def close(self) -> None:
        """Remove this node's safe-point records and the flag (at shutdown)."""
        self._deferral = None
        self._clear()
        if self._flag is not None:
            self._session.discard(SAFE_POINT_KIND, self._node_id)
            self._flag.close()


def read_gate_records(
    list_tags: Callable[[], dict[str, str]], read: Callable[[str], bytes | None]
) -> list[dict[str, Any]]:
    """The deferral records of a run (status), decoded; unreadable ones are skipped."""
    out = []
    for name in sorted(list_tags()):
        with contextlib.suppress(RendezvousError, ValueError):
            raw = read(name)
            if raw is not None:
                body = json.loads(raw)
                if isinstance(body, dict):
                    out.append({**body, "by": name})
    return out
