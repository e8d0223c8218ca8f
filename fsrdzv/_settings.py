"""Validated rendezvous settings: torch's keys, names and defaults, seconds as floats.

This module is the one place of every default and every validator: :class:`Settings` for the protocol,
:data:`LAUNCH_DEFAULTS` for ``fsrdzv run``, and the value parsers :func:`parse_seconds`, :func:`parse_count` and
:func:`parse_bool`, which the command line, ``--rdzv-conf`` and the stores' options all use, so that a value means
the same wherever it is written. Every refusal names the key, the value and what to write instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._errors import ConfigurationError
from ._names import validate_run_id

__all__ = [
    "BOOL_FALSE",
    "BOOL_TRUE",
    "COUNT_KEYS",
    "DEFAULTS",
    "LAUNCH_DEFAULTS",
    "SECONDS_KEYS",
    "Settings",
    "parse_bool",
    "parse_count",
    "parse_seconds",
    "set_nested",
]

#: Spellings of a boolean in text (torch's ``get_as_bool`` plus on/off), compared after strip() and lower().
BOOL_TRUE: Final = frozenset({"1", "true", "t", "yes", "y", "on"})
BOOL_FALSE: Final = frozenset({"0", "false", "f", "no", "n", "off"})

#: The duration settings of :class:`Settings` (seconds) and its counts besides the node counts.
SECONDS_KEYS: Final = ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout", "keep_alive_interval")
COUNT_KEYS: Final = ("keep_alive_max_attempt",)

#: Defaults of ``fsrdzv run``'s own timings: membership check period (s), SIGTERM-to-SIGKILL grace (s), and the
#: peers whose heartbeats each node reads (0: all).
LAUNCH_DEFAULTS: Final[Mapping[str, float | int]] = {"monitor_interval": 1.0, "stop_timeout": 10.0, "watch_peers": 2}


def _invalid(key: str, value: object, problem: str, expected: str, source: str) -> ConfigurationError:
    # Without a source, the form of the settings' messages; with one, the form of --rdzv-conf's (documented in
    # docs/how-to/troubleshooting.md): both name the key, the value and what to write instead.
    if source:
        return ConfigurationError(f"invalid {source} value {key}={value!r}: expected {expected}")
    return ConfigurationError(f"{key}={value!r} {problem}")


_SECONDS: Final = "a positive number of seconds"
_BOOLEAN: Final = "a boolean (true/false, yes/no, on/off, 1/0)"


def parse_seconds(key: str, value: object, *, source: str = "") -> float:
    """A positive, finite number of seconds from a number, a numeric string or a ``timedelta``.

    :param source: where the value was written (``"--rdzv-conf"``, ``"storage option"``), for the message.
    :raises ConfigurationError: naming ``key`` and ``value``.
    """
    if isinstance(value, datetime.timedelta):
        number = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _invalid(key, value, "is not a number of seconds", _SECONDS, source)
    else:
        try:
            number = float(value)
        except ValueError:
            raise _invalid(key, value, "is not a number of seconds", _SECONDS, source) from None
    if not math.isfinite(number) or number <= 0:
        raise _invalid(key, value, f"must be {_SECONDS}", _SECONDS, source)
    return number


def parse_count(key: str, value: object, minimum: int = 1, *, source: str = "") -> int:
    """An integer of at least ``minimum`` from an int, an integral float or a string of digits.

    :raises ConfigurationError: naming ``key`` and ``value``.
    """
    expected = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise _invalid(key, value, "is not an integer", expected, source)
    try:
        number = int(value.strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise _invalid(key, value, "is not an integer", expected, source) from None
    if number < minimum:
        raise _invalid(key, value, f"must be at least {minimum}", expected, source)
    return number


def parse_bool(key: str, value: object, *, source: str = "") -> bool:
    """A boolean from a bool, 0/1, or one of :data:`BOOL_TRUE` / :data:`BOOL_FALSE` ("false" is not truthy).

    :raises ConfigurationError: naming ``key`` and ``value``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in BOOL_TRUE or text in BOOL_FALSE:
            return text in BOOL_TRUE
    raise _invalid(key, value, f"is not {_BOOLEAN}; use true or false", _BOOLEAN, source)


def _validated(values: Mapping[str, object], source: str) -> dict[str, Any]:
    """``values`` (every field of :class:`Settings`) parsed and checked, or a ConfigurationError."""
    out: dict[str, Any] = dict(values)
    out["run_id"] = validate_run_id(values["run_id"])
    for name in ("min_nodes", "max_nodes", *COUNT_KEYS):
        out[name] = parse_count(name, values[name], source=source)
    if out["max_nodes"] < out["min_nodes"]:
        raise ConfigurationError(
            f"max_nodes ({out['max_nodes']}) must be greater than or equal to min_nodes ({out['min_nodes']})"
        )
    for name in SECONDS_KEYS:
        out[name] = parse_seconds(name, values[name], source=source)
    expected = values.get("expected_nodes", ())
    names = expected.split(",") if isinstance(expected, str) else expected
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise _invalid("expected_nodes", expected, "must be a list of host names", "host names", source)
    out["expected_nodes"] = tuple(n.strip() for n in names if n.strip())
    out["applied_history"] = parse_count("applied_history", values.get("applied_history", 1024), source=source)
    return out


def set_nested(target: dict[str, Any], dotted: str, value: object) -> None:
    """``target["a"]["b"] = value`` for ``dotted="a.b"`` (storage options such as ``client_kwargs.region_name``).

    :raises ConfigurationError: a parent key already holds a plain value.
    """
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigurationError(f"storage option {dotted!r}: {key!r} is already set to a plain value")
        target = child
    target[leaf] = value


@dataclass(frozen=True)
class Settings:
    """Everything the protocol needs to decide, validated once.

    The defaults are torch's: join 600 s, last call 30 s, close 30 s, heartbeat op 5 s, keep-alive every 5 s, a node
    is dead after 3 missed keep-alives. Unlike torch, zero or negative keep-alive settings are refused.

    ``heartbeat_timeout`` is the deadline of the reads behind ``num_nodes_waiting`` and ``is_closed`` (torch's
    "heartbeat op" timeout), not a limit on one keep-alive write.
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
    #: The host names the job expects (Slurm's node list, ``expected_nodes=``): named when they are missing.
    expected_nodes: tuple[str, ...] = ()
    #: How many departed nodes' last folded requests the document remembers (``_state.APPLIED_HISTORY``); a
    #: parameter so that tests can pass the history limit with few nodes.
    applied_history: int = 1024

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in _validated(values, "").items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, source: str = "") -> Settings:
        """Settings from ``{key: value}`` with torch's key names; values may be numbers or strings.

        :param source: where the values were written (``"--rdzv-conf"``), named in every error message.
        :raises ConfigurationError: an unknown or missing key, or a malformed value, naming the key and the value.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        where = f" in {source}" if source else ""
        for key, value in values.items():
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ";"
                raise ConfigurationError(
                    f"unknown setting {key!r} (value {value!r}){where}{suggestion} known: {', '.join(known)}"
                )
        missing = [key for key in ("run_id", "min_nodes", "max_nodes") if key not in values]
        if missing:
            raise ConfigurationError(f"missing setting(s) {', '.join(missing)}{where}")
        return cls(**_validated({**DEFAULTS, **values}, source))

    @property
    def liveness_timeout(self) -> float:
        """Seconds without an observed heartbeat change after which a node is dead."""
        return self.keep_alive_interval * self.keep_alive_max_attempt


#: The default of every optional :class:`Settings` field (torch's), by name.
DEFAULTS: Final[Mapping[str, float | int]] = {
    f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING
}
