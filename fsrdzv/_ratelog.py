"""Repeated log lines at a bounded rate: during an outage a node would otherwise log the same failure every
retry (a keep-alive retried every half second, a launcher's membership check every second)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Final

__all__ = ["REPEAT_PERIOD", "log_limited"]

#: A repeated line (same logger, message and key) is logged at most once per this many seconds.
REPEAT_PERIOD: Final = 30.0

_lock = threading.Lock()
#: (logger, message, key) -> (when it may be logged again, how many were held back since)
_held: dict[tuple[str, str, str], tuple[float, int]] = {}


def log_limited(logger: logging.Logger, level: int, msg: str, *args: object, key: str = "") -> None:
    """Log ``msg % args`` unless the same line (logger, ``msg``, ``key``) was logged less than REPEAT_PERIOD
    seconds ago; the next line that is logged says how many were held back meanwhile."""
    now = time.monotonic()
    slot = (logger.name, msg, key)
    with _lock:
        due, held = _held.get(slot, (0.0, 0))
        if now < due:
            _held[slot] = (due, held + 1)
            return
        _held[slot] = (now + REPEAT_PERIOD, 0)
    if held:
        logger.log(level, msg + " (%d more like it in the last %.0f s)", *args, held, REPEAT_PERIOD)
    else:
        logger.log(level, msg, *args)
