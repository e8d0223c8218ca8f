"""fsrdzv's log lines under torchrun, which configures only torch's own loggers."""

from __future__ import annotations

import logging
import os

__all__ = ["show_logs"]

_FORMAT = "[fsrdzv %(levelname).1s %(asctime)s %(process)d] %(message)s"


def show_logs() -> None:
    """Give the ``fsrdzv`` loggers a handler on stderr unless the program configured logging itself.

    torchrun prints torch's log lines through handlers of its own; fsrdzv's would otherwise go to Python's
    last-resort handler, which drops INFO, and the progress lines of a waiting node (``fsrdzv.progress``) are the
    point of waiting visibly. ``LOGLEVEL`` (torch's variable) sets the level of every fsrdzv logger when given;
    without it fsrdzv shows warnings, and the progress lines at INFO.
    """
    root = logging.getLogger("fsrdzv")
    if root.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    level = os.environ.get("LOGLEVEL", "").strip().upper()
    if isinstance(logging.getLevelName(level), int):  # a known level name (getLevelName maps both ways)
        root.setLevel(level)
        return
    root.setLevel(logging.WARNING)
    logging.getLogger("fsrdzv.progress").setLevel(logging.INFO)
