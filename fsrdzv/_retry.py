"""One retry object for every wait on storage (kazoo's ``KazooRetry``: backoff, jitter, max delay, deadline).

Sleep, clock and random source are injected, so a retry under a fake or virtual clock takes no real time. A
:class:`Retry` is an immutable description; each operation takes its own :class:`Attempts` (kazoo's ``copy()``),
which counts the failures of that operation only.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from ._errors import StorageError

__all__ = ["PERMANENT_ERRNOS", "Attempts", "Retry"]

log = logging.getLogger("fsrdzv")

#: Errors that retrying cannot fix: report them at once.
PERMANENT_ERRNOS: Final = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT})

_T = TypeVar("_T")


@dataclass(frozen=True)
class Retry:
    """How to wait between tries: ``delay``, then ``backoff`` times longer each time up to ``max_delay``, each
    sleep scaled by a uniform factor in ``[1 - max_jitter, 1 + max_jitter]`` so that retries do not collide.

    ``outage`` bounds how long storage may keep failing (from the first failure) before an operation gives up;
    a deadline passed to :meth:`Attempts.failed` bounds it too. ``label`` names the operation in the log.
    """

    delay: float
    max_delay: float
    backoff: float = 2.0
    max_jitter: float = 0.5
    outage: float = float("inf")
    label: str = ""
    permanent: frozenset[int] = PERMANENT_ERRNOS
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def attempts(self) -> Attempts:
        """A fresh count of failures for one operation."""
        return Attempts(self)

    def __call__(self, fn: Callable[[], _T], deadline: float) -> _T:
        """Run ``fn``, retrying storage errors until ``deadline`` (every operation retried here is idempotent)."""
        attempts = self.attempts()
        while True:
            try:
                return fn()
            except StorageError as exc:
                attempts.failed(exc, deadline)


class Attempts:
    """The failures (or waits) of one operation under a :class:`Retry`."""

    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self._count = 0
        self._first = 0.0

    def reset(self) -> None:
        """The operation succeeded: the next failure starts the backoff again."""
        self._count = 0

    def delay(self) -> float:
        """The next sleep (jittered) without taking it; counts as one try."""
        r = self.retry
        base = min(r.max_delay, r.delay * r.backoff**self._count)
        self._count += 1
        return base * r.rng.uniform(1 - r.max_jitter, 1 + r.max_jitter)

    def pause(self) -> None:
        """Sleep before the next try of an operation that lost a race (no error to judge)."""
        self.retry.sleep(self.delay())

    def failed(self, exc: StorageError, deadline: float) -> None:
        """Sleep before the next try, or re-raise ``exc`` if the operation must give up."""
        r = self.retry
        now = r.clock()
        if self._count == 0:
            self._first = now
        if exc.errno in r.permanent or now > deadline or now - self._first > r.outage:
            raise exc
        log.warning("storage error %s (retrying): %s", r.label, exc)
        r.sleep(self.delay())
