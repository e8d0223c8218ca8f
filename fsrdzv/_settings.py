"""Validated rendezvous settings (torch's keys, names and defaults; seconds as floats)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._errors import ConfigurationError
from ._store import validate_run_id

__all__ = ["Settings"]


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigurationError(f"{name}={value!r} is not a number of seconds")
    try:
        number = float(value)
    except ValueError:
        raise ConfigurationError(f"{name}={value!r} is not a number of seconds") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigurationError(f"{name}={value!r} must be a positive number of seconds")
    return number


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r} is not an integer")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise ConfigurationError(f"{name}={value!r} is not an integer") from None
    if isinstance(value, float) and not value.is_integer():
        raise ConfigurationError(f"{name}={value!r} is not an integer")
    if number < minimum:
        raise ConfigurationError(f"{name}={value!r} must be at least {minimum}")
    return number


@dataclass(frozen=True)
class Settings:
    """Everything the protocol needs to decide, validated once.

    The defaults are torch's: join 600 s, last call 30 s, close 30 s, heartbeat op 5 s, keep-alive every 5 s, a node
    is dead after 3 missed keep-alives. Unlike torch, zero or negative keep-alive settings are refused.
    """

    run_id: str
    min_nodes: int
    max_nodes: int
    join_timeout: float = 600.0
    last_call_timeout: float = 30.0
    close_timeout: float = 30.0
    heartbeat_timeout: float = 5.0
    keep_alive_interval: float = 5.0
    keep_alive_max_attempt: int = 3

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        object.__setattr__(self, "min_nodes", _count("min_nodes", self.min_nodes, 1))
        object.__setattr__(self, "max_nodes", _count("max_nodes", self.max_nodes, 1))
        if self.max_nodes < self.min_nodes:
            raise ConfigurationError(
                f"max_nodes ({self.max_nodes}) must be greater than or equal to min_nodes ({self.min_nodes})"
            )
        for name in ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout", "keep_alive_interval"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        object.__setattr__(
            self, "keep_alive_max_attempt", _count("keep_alive_max_attempt", self.keep_alive_max_attempt, 1)
        )

    @property
    def liveness_timeout(self) -> float:
        """Seconds without an observed heartbeat change after which a node is dead."""
        return self.keep_alive_interval * self.keep_alive_max_attempt
