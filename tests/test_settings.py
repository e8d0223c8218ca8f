"""Settings validation: torch's keys and defaults, and a ConfigurationError (a ValueError) naming key and value."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest

from fsrdzv import ConfigurationError, Settings
from fsrdzv._settings import DEFAULTS, parse_bool, parse_count, parse_seconds, set_nested
from fsrdzv._store import validate_run_id

TIMEOUTS = ["join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout", "keep_alive_interval"]
COUNTS = ["min_nodes", "max_nodes", "keep_alive_max_attempt"]


def make(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"run_id": "job-1", "min_nodes": 1, "max_nodes": 4, **overrides}
    return Settings(**values)


def test_defaults_are_torchs() -> None:
    s = make()
    assert (s.join_timeout, s.last_call_timeout, s.close_timeout, s.heartbeat_timeout) == (600, 30, 30, 5)
    assert (s.keep_alive_interval, s.keep_alive_max_attempt) == (5, 3)
    assert s.liveness_timeout == 15


def test_min_equals_max_is_accepted() -> None:
    s = make(min_nodes=3, max_nodes=3)
    assert (s.min_nodes, s.max_nodes) == (3, 3)


@pytest.mark.parametrize(
    ("given", "expected"),
    [(1, 1.0), (0.25, 0.25), ("600", 600.0), (" 2.5 ", 2.5), ("1e2", 100.0), (10**6, 1e6)],
    ids=["int", "float", "str-int", "str-float-spaces", "str-exp", "large"],
)
@pytest.mark.parametrize("key", TIMEOUTS)
def test_timeouts_accept_positive_seconds(key: str, given: object, expected: float) -> None:
    value = getattr(make(**{key: given}), key)
    assert value == expected and isinstance(value, float)


@pytest.mark.parametrize(
    ("given", "expected"),
    [(2, 2), ("3", 3), (" 4 ", 4), (5.0, 5)],
    ids=["int", "str", "str-spaces", "integral-float"],
)
@pytest.mark.parametrize("key", COUNTS)
def test_counts_accept_integers(key: str, given: object, expected: int) -> None:
    overrides: dict[str, Any] = {key: given}
    if key == "min_nodes":
        overrides["max_nodes"] = 10
    value = getattr(make(**overrides), key)
    assert value == expected and type(value) is int


def test_liveness_timeout_is_interval_times_attempts() -> None:
    assert make(keep_alive_interval=0.5, keep_alive_max_attempt=4).liveness_timeout == 2.0


def assert_rejected(key: str, value: object, **overrides: Any) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        make(**{key: value}, **overrides)
    error = info.value
    assert isinstance(error, ValueError)
    message = str(error)
    assert key in message, f"{message!r} does not name {key}"
    assert repr(value) in message or str(value) in message, f"{message!r} does not show {value!r}"
    assert "\n" not in message
    return error


BAD_SECONDS: list[tuple[str, object]] = [
    ("zero", 0),
    ("zero-float", 0.0),
    ("negative", -1),
    ("negative-small", -0.001),
    ("negative-str", "-5"),
    ("zero-str", "0"),
    ("nan", math.nan),
    ("inf", math.inf),
    ("neg-inf", -math.inf),
    ("nan-str", "nan"),
    ("inf-str", "inf"),
    ("word", "ten"),
    ("empty-str", ""),
    ("unit-suffix", "30s"),
    ("none", None),
    ("list", [5]),
    ("true", True),
    ("false", False),
    ("bytes", b"5"),
]


@pytest.mark.parametrize("value", [b[1] for b in BAD_SECONDS], ids=[b[0] for b in BAD_SECONDS])
@pytest.mark.parametrize("key", TIMEOUTS)
def test_bad_timeouts_are_refused(key: str, value: object) -> None:
    assert_rejected(key, value)


BAD_COUNTS: list[tuple[str, object]] = [
    ("zero", 0),
    ("negative", -10),
    ("fraction", 2.5),
    ("fraction-str", "2.5"),
    ("word", "three"),
    ("empty-str", ""),
    ("none", None),
    ("true", True),
    ("false", False),
    ("nan", math.nan),
    ("list", [2]),
]
INF_COUNT = pytest.param(math.inf, id="inf")


@pytest.mark.parametrize("value", [*(pytest.param(b[1], id=b[0]) for b in BAD_COUNTS), INF_COUNT])
@pytest.mark.parametrize("key", COUNTS)
def test_bad_counts_are_refused(key: str, value: object) -> None:
    overrides: dict[str, Any] = {"max_nodes": 10} if key == "min_nodes" else {}
    if key == "max_nodes":
        overrides = {"min_nodes": 1}
    assert_rejected(key, value, **overrides)


@pytest.mark.parametrize(("min_nodes", "max_nodes"), [(2, 1), (10, 9), (5, 1)])
def test_min_greater_than_max_is_refused(min_nodes: int, max_nodes: int) -> None:
    with pytest.raises(ConfigurationError) as info:
        make(min_nodes=min_nodes, max_nodes=max_nodes)
    message = str(info.value)
    assert f"max_nodes ({max_nodes})" in message and f"min_nodes ({min_nodes})" in message


@pytest.mark.parametrize("min_nodes", [0, -1])
def test_min_below_one_is_refused(min_nodes: int) -> None:
    error = assert_rejected("min_nodes", min_nodes)
    assert "at least 1" in str(error)


BAD_RUN_IDS: list[tuple[str, object]] = [
    ("parent-traversal", "../x"),
    ("dotdot", ".."),
    ("dot", "."),
    ("hidden", ".job"),
    ("slash", "a/b"),
    ("backslash", "a\\b"),
    ("absolute", "/etc"),
    ("empty", ""),
    ("too-long", "a" * 200),
    ("129-chars", "a" * 129),
    ("space", "my job"),
    ("leading-space", " job"),
    ("nul", "job\x00"),
    ("colon", "job:1"),
    ("glob", "job*"),
    ("percent", "job%2F"),
    ("unicode", "jöb"),
    ("leading-dash", "-job"),
    ("not-a-string", 42),
    ("none", None),
]


TRAILING_NEWLINE = pytest.param("job\n", id="trailing-newline")


@pytest.mark.parametrize("run_id", [*(pytest.param(b[1], id=b[0]) for b in BAD_RUN_IDS), TRAILING_NEWLINE])
def test_bad_run_ids_are_refused(run_id: object) -> None:
    for check in (lambda: validate_run_id(run_id), lambda: make(run_id=run_id)):
        with pytest.raises(ConfigurationError) as info:
            check()
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert "run id" in message and repr(run_id) in message


@pytest.mark.parametrize(
    "run_id", ["1", "job-1", "J.o_b-2", "a" * 128, "123456789", "slurm.4242_7"], ids=lambda r: r[:12]
)
def test_good_run_ids_are_accepted(run_id: str) -> None:
    assert validate_run_id(run_id) == run_id
    assert make(run_id=run_id).run_id == run_id


def test_settings_are_frozen() -> None:
    s = make()
    with pytest.raises(AttributeError):
        s.min_nodes = 3  # type: ignore[misc]


# -- Settings.from_mapping and the shared value parsers ------------------------------------------------------------


def test_from_mapping_takes_strings_and_fills_torchs_defaults() -> None:
    s = Settings.from_mapping({"run_id": "job-1", "min_nodes": "2", "max_nodes": 4, "join_timeout": " 90 "})
    assert (s.min_nodes, s.max_nodes, s.join_timeout) == (2, 4, 90.0)
    assert s == make(min_nodes=2, join_timeout=90)
    assert {k: getattr(s, k) for k in DEFAULTS if k != "join_timeout"} == {
        k: v for k, v in DEFAULTS.items() if k != "join_timeout"
    }


def test_defaults_are_the_dataclass_defaults() -> None:
    assert DEFAULTS == {
        "join_timeout": 600.0,
        "last_call_timeout": 30.0,
        "close_timeout": 30.0,
        "heartbeat_timeout": 5.0,
        "keep_alive_interval": 5.0,
        "keep_alive_max_attempt": 3,
        "expected_nodes": (),
        "applied_history": 1024,
    }


def test_from_mapping_names_the_source_key_and_value() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"^invalid --rdzv-conf value join_timeout='soon': expected a positive number of seconds$",
    ):
        Settings.from_mapping(
            {"run_id": "a", "min_nodes": 1, "max_nodes": 1, "join_timeout": "soon"}, source="--rdzv-conf"
        )
    with pytest.raises(
        ConfigurationError, match=r"unknown setting 'heartbeat' \(value 9\).*did you mean 'heartbeat_timeout'"
    ):
        Settings.from_mapping({"run_id": "a", "min_nodes": 1, "max_nodes": 1, "heartbeat": 9})
    with pytest.raises(ConfigurationError, match=r"missing setting.*max_nodes"):
        Settings.from_mapping({"run_id": "a", "min_nodes": 1})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (0, False), (1, True), (" YES ", True), ("on", True), ("off", False), ("f", False), ("0", False)],
)
def test_one_boolean_vocabulary(value: object, expected: bool) -> None:
    assert parse_bool("lock", value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, None, "", 0.5])
def test_bad_booleans_are_refused_with_key_and_value(value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_bool("lock", value, source="storage option")
    assert f"lock={value!r}" in str(info.value) and "true/false" in str(info.value)


def test_seconds_and_counts_share_the_settings_rules() -> None:
    assert parse_seconds("t", datetime.timedelta(minutes=2)) == 120.0
    assert parse_count("n", "0", minimum=0) == 0
    with pytest.raises(ConfigurationError, match="n=-1 must be at least 0"):
        parse_count("n", -1, minimum=0)


def test_set_nested_builds_dotted_options_and_refuses_a_plain_parent() -> None:
    options: dict[str, Any] = {}
    set_nested(options, "client_kwargs.region_name", "eu-west-1")
    set_nested(options, "lock", False)
    assert options == {"client_kwargs": {"region_name": "eu-west-1"}, "lock": False}
    with pytest.raises(ConfigurationError, match="'lock' is already set to a plain value"):
        set_nested(options, "lock.x", 1)
