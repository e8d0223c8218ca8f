"""What a waiting node says it waits for: one INFO line at least every ``EVERY`` seconds.

``waiting for run 'job-42' round 3: 1 of 2 nodes (max 4); last call ends in 12 s``, and once the node has waited
``NAME_MISSING_AFTER`` seconds, the expected nodes (``expected_nodes``, Slurm's node list) that are not in the
document: ``; missing: node03 (never seen), node07 (last seen 42 s ago)``. The join-timeout message names them too.
"""

from __future__ import annotations

import logging
from typing import Final

from ._roster import missing_nodes, short_name
from ._settings import Settings
from ._state import RendezvousState

__all__ = ["EVERY", "NAME_MISSING_AFTER", "ProgressReport"]

log = logging.getLogger("fsrdzv.progress")

#: Seconds between two progress lines of a waiting node.
EVERY: Final = 10.0
#: After this long (s) the progress line names the expected nodes that are missing.
NAME_MISSING_AFTER: Final = 60.0
#: Missing nodes named in one line at most (the count says how many more).
MAX_NAMED: Final = 8


class ProgressReport:
    """One join's progress lines, and when this node last saw each expected host in the document."""

    def __init__(self, settings: Settings, me: str) -> None:
        self.settings = settings
        self.me = me
        self._start = 0.0
        self._next = 0.0
        self._seen: dict[str, float] = {}

    def start(self, now: float) -> None:
        self._start, self._next = now, now + EVERY

    def tick(self, state: RendezvousState | None, now: float, last_call_seen_at: float | None) -> None:
        """Note who is in ``state``; log the progress line when one is due."""
        if state is not None and self.settings.expected_nodes:
            for node in state.nodes.values():
                self._seen[short_name(node.host or node.addr)] = now
        if now < self._next:
            return
        self._next = now + EVERY
        log.info("%s", self.line(state, now, last_call_seen_at))

    def line(self, state: RendezvousState | None, now: float, last_call_seen_at: float | None) -> str:
        s = self.settings
        if state is None:
            return f"waiting for run {s.run_id!r}: no document yet"
        where = f"waiting for run {s.run_id!r} round {state.round}"
        if state.complete:
            text = f"{where} (complete with {len(state.participants)} nodes): waiting as a spare for the next round"
        else:
            text = f"{where}: {len(state.participants)} of {s.min_nodes} nodes (max {s.max_nodes})"
            if last_call_seen_at is not None:
                left = max(0.0, s.last_call_timeout - (now - last_call_seen_at))
                text += f"; last call ends in {left:.0f} s"
        if now - self._start >= NAME_MISSING_AFTER:
            text += self.missing(state, now)
        return text

    def missing(self, state: RendezvousState, now: float) -> str:
        """``"; missing: a (never seen), b (last seen 12 s ago)"``, or "" when nothing expected is missing."""
        hosts = [n.host or n.addr for n in state.nodes.values()]
        gone = missing_nodes(self.settings.expected_nodes, hosts)
        if not gone:
            return ""
        named = []
        for name in gone[:MAX_NAMED]:
            seen = self._seen.get(short_name(name))
            named.append(f"{name} (never seen)" if seen is None else f"{name} (last seen {now - seen:.0f} s ago)")
        more = f" and {len(gone) - MAX_NAMED} more" if len(gone) > MAX_NAMED else ""
        return f"; missing {len(gone)} of {len(self.settings.expected_nodes)} expected: {', '.join(named)}{more}"
