"""Skew-free liveness: has a node's heartbeat record *changed* within the timeout, on the observer's clock?

No timestamp written by another host is ever compared with this host's clock. Each observer remembers, per
node, the record tag it last saw and the local monotonic time it first saw that tag. A node is dead when its tag
has not changed for ``timeout`` seconds of the observer's own time. A fresh observer therefore waits a full
timeout before it can call anyone dead: it errs towards "alive", never towards a false death.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["LivenessTracker"]


class LivenessTracker:
    """Per-observer memory of heartbeat tags.

    :param timeout: seconds without an observed change after which a node is dead.
    :param max_gap: if this observer itself saw nothing for longer than this (its own storage outage, or it was
        busy elsewhere), only ``max_gap`` of that blind spell is counted against the others: a long blind spell
        never causes a false death, and an observer that can only look slowly (throttled by its read budget)
        still detects dead nodes, a little later.
    """

    def __init__(self, timeout: float, max_gap: float | None = None) -> None:
        self.timeout = timeout
        self.max_gap = timeout / 2 if max_gap is None else max_gap
        self._seen: dict[str, tuple[str | None, float]] = {}
        self._last: float | None = None

    def observe(self, tags: Mapping[str, str], now: float, members: Iterable[str]) -> None:
        """Record one listing of heartbeat tags, taken at local time ``now``, for the given members."""
        if self._last is not None and now - self._last > self.max_gap:
            blind = now - self._last - self.max_gap
            self._seen = {k: (tag, since + blind) for k, (tag, since) in self._seen.items()}
        self._last = now
        for node_id in members:
            tag = tags.get(node_id)
            previous = self._seen.get(node_id)
            if previous is None or previous[0] != tag:
                self._seen[node_id] = (tag, now)

    def dead(self, members: Iterable[str], now: float) -> set[str]:
        """Members whose heartbeat has not changed for at least ``timeout`` seconds of observed time."""
        out = set()
        for node_id in members:
            seen = self._seen.get(node_id)
            if seen is not None and now - seen[1] >= self.timeout:
                out.add(node_id)
        return out

    def missing(self, tags: Mapping[str, str], members: Iterable[str]) -> set[str]:
        """Members with no heartbeat record at all (they left cleanly, or never wrote one)."""
        return {m for m in members if m not in tags}

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for node_id in list(self._seen):
            if node_id not in keep:
                del self._seen[node_id]
