"""Skew-free liveness: has a node's heartbeat record *changed* within the timeout, on the observer's clock?

No timestamp written by another host is ever compared with this host's clock. Each observer remembers, per
node, the record tag it last saw and the local monotonic time it first saw that tag. A node is dead when its tag
has not changed for ``timeout`` seconds of the observer's own time. A fresh observer therefore waits a full
timeout before it can call anyone dead: it errs towards "alive", never towards a false death.

The same memory gives ``fsrdzv status`` its heartbeat ages (:meth:`LivenessTracker.age`) and ``fsrdzv gc`` its
verdict, so that the handler, the launcher and the operator's tools judge liveness in one way.
"""

from __future__ import annotations

import math
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

    def __init__(self, timeout: float, max_gap: float | None = None, fresh_credit: float = 0.0) -> None:
        self.timeout = timeout
        self.max_gap = timeout / 2 if max_gap is None else max_gap
        #: A record seen for the first time counts as this old already, and a changed one as written in the middle
        #: of the gap since this observer's previous look, at most this long ago: the middle of the window the
        #: write must lie in (the keep-alive gives fresh_credit = interval / 2), so that on average an observer
        #: calls a node dead when torch's timestamps would, not a full timeout after it started to look.
        self.fresh_credit = fresh_credit
        self._seen: dict[str, tuple[str | None, float]] = {}
        self._last: float | None = None
        #: Nodes whose tag this observer has seen change (or appear after its first look): their age is exact.
        self._changed: set[str] = set()
        #: How many listings this observer has taken, and the local time of the first.
        self.observations = 0
        self.first_observation: float | None = None
        #: Another observer's estimates of when nodes last changed, and the least silence they leave (see seed).
        self._seeds: dict[str, float] = {}
        self._seed_floor = 0.0

    @classmethod
    def observer(cls) -> LivenessTracker:
        """A tracker that only measures ages (``fsrdzv status``): nobody is ever dead, no blind spell is discounted."""
        return cls(math.inf, max_gap=math.inf)

    def observe(self, tags: Mapping[str, str], now: float, members: Iterable[str]) -> None:
        """Record one listing of heartbeat tags, taken at local time ``now``, for the given members."""
        # A change seen now happened after this observer's previous look: count it from the middle of that gap.
        credit = self.fresh_credit if self._last is None else min(self.fresh_credit, max(0.0, now - self._last) / 2)
        if self._last is not None and now - self._last > self.max_gap:
            blind = now - self._last - self.max_gap
            self._seen = {k: (tag, since + blind) for k, (tag, since) in self._seen.items()}
        self._last = now
        if self.first_observation is None:
            self.first_observation = now
        for node_id in members:
            tag = tags.get(node_id)
            previous = self._seen.get(node_id)
            if previous is None or previous[0] != tag:
                since = now - credit
                seed = self._seeds.get(node_id)
                if seed is not None:
                    since = min(since, max(seed, now - self._seed_floor))
                self._seen[node_id] = (tag, since)
                # A node that first shows up after our first look was written while we watched: a real change.
                if previous is not None or self.observations > 0:
                    self._changed.add(node_id)
        self.observations += 1
        self._seeds = {}

    def seed(self, since: Mapping[str, float], floor: float) -> None:
        """Estimates, by another observer on this host's clock, of when nodes last changed (its :meth:`changes`).

        At this tracker's next observation a node counts from its estimate whatever tag it shows (the other
        observer may read another kind of tag), but never from more than ``floor`` seconds before that
        observation: a live node, which writes once per interval, keeps time to show a change. A survivor that
        re-joins therefore times a dead peer from its last heartbeat as its watch saw it, not from its join.
        """
        self._seeds = dict(since)
        self._seed_floor = floor

    def changes(self, nodes: Iterable[str]) -> dict[str, float]:
        """When each of ``nodes`` last changed, as estimated on this observer's clock (nodes never seen omitted)."""
        return {n: seen[1] for n in nodes if (seen := self._seen.get(n)) is not None}

    def dead(self, members: Iterable[str], now: float) -> set[str]:
        """Members whose heartbeat has not changed for at least ``timeout`` seconds of observed time."""
        out = set()
        for node_id in members:
            seen = self._seen.get(node_id)
            if seen is not None and now - seen[1] >= self.timeout:
                out.add(node_id)
        return out

    def next_death(self, members: Iterable[str]) -> float | None:
        """The earliest local time at which a member could be dead, if its record does not change before."""
        times = [seen[1] + self.timeout for m in members if (seen := self._seen.get(m)) is not None]
        return min(times, default=None)

    def missing(self, tags: Mapping[str, str], members: Iterable[str]) -> set[str]:
        """Members with no heartbeat record at all (they left cleanly, or never wrote one)."""
        return {m for m in members if m not in tags}

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for node_id in list(self._seen):
            if node_id not in keep:
                del self._seen[node_id]
        self._changed &= keep

    def age(self, node_id: str, now: float) -> float | None:
        """Seconds since this observer saw ``node_id``'s tag change (None if it never saw the node)."""
        seen = self._seen.get(node_id)
        return None if seen is None else max(0.0, now - seen[1])

    def changed(self, node_id: str) -> bool:
        """Whether this observer saw the tag change; if not, :meth:`age` is only a lower bound."""
        return node_id in self._changed

    def changed_since(self, start: float) -> set[str]:
        """Nodes whose tag changed (or that appeared) at or after local time ``start``."""
        return {n for n in self._changed if self._seen[n][1] >= start}
