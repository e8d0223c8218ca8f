"""Text for one-line messages: errors from servers and subprocesses carry newlines, XML and long bodies."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(text: object, limit: int | None = 300) -> str:
    """Collapse whitespace (newlines included) and, with a ``limit``, cut long text with an ellipsis."""
    flat = " ".join(str(text).split())
    return flat if limit is None or len(flat) <= limit else flat[: limit - 3] + "..."
