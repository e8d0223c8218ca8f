"""Skew-free liveness: a node is dead when its heartbeat tag has not changed for ``timeout`` of the observer's time.

Times are multiples of 1/8 s so that shifting them by +-3600 s is exact in floating point: any difference in
verdicts between observers is then a real dependence on the clock offset, not rounding.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsrdzv._liveness import LivenessTracker

NODE = "node-a"
TIMEOUT = 15.0  # torch's default: keep_alive_interval 5 s x keep_alive_max_attempt 3
OFFSETS = (-3600.0, -0.125, 0.0, 1.5, 3600.0)


def tag_at(beats: Sequence[float], t: float) -> str | None:
    """The node's heartbeat record at world time ``t``: a new tag at every beat, none before the first."""
    count = bisect_right(beats, t)
    return None if count == 0 else f"etag-{count}"


def verdicts(
    beats: Sequence[float],
    looks: Sequence[float],
    offset: float,
    timeout: float = TIMEOUT,
    max_gap: float | None = None,
) -> list[bool]:
    """Whether an observer whose clock reads world time + ``offset`` calls NODE dead at each of its looks."""
    tracker = LivenessTracker(timeout, max_gap)
    out = []
    for t in looks:
        tag = tag_at(beats, t)
        now = t + offset
        tracker.observe({} if tag is None else {NODE: tag}, now, [NODE])
        out.append(NODE in tracker.dead([NODE], now))
    return out


def grid(start: float, stop: float, step: float) -> list[float]:
    count = int((stop - start) / step)
    return [start + i * step for i in range(count + 1)]


# -- examples --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", OFFSETS)
def test_beating_node_is_never_dead(offset: float) -> None:
    beats = grid(0, 600, 5)  # every keep_alive_interval
    looks = grid(0.25, 600, 2.5)  # the handler sweeps every interval / 2
    assert not any(verdicts(beats, looks, offset))


@pytest.mark.parametrize("offset", OFFSETS)
def test_unchanged_tag_for_the_timeout_is_dead(offset: float) -> None:
    beats = [0.0, 5.0, 10.0]  # last beat at 10: the tag is first seen unchanged at 10
    looks = grid(0, 40, 0.125)
    result = dict(zip(looks, verdicts(beats, looks, offset), strict=True))
    assert not result[10 + TIMEOUT - 0.125]
    assert result[10 + TIMEOUT], "exactly `timeout` without a change is dead"
    assert all(result[t] for t in looks if t >= 10 + TIMEOUT)


def test_deadline_counts_from_when_the_observer_saw_the_change() -> None:
    """The node beat at 10, but this observer only looked at 12: it waits until 12 + timeout."""
    looks = [0.0, 2.0, 4.0, 6.0, 8.0, 12.0, 14.0, 18.0, 22.0, 26.0, 26.5, 27.0]
    result = dict(zip(looks, verdicts([0.0, 10.0], looks, 0.0, max_gap=10), strict=True))
    assert not result[26.5] and result[27.0]


@pytest.mark.parametrize("offset", OFFSETS)
def test_fresh_observer_waits_a_full_timeout(offset: float) -> None:
    """An observer starting long after the node's last beat still gives it a full timeout of its own time."""
    beats = [0.0]  # the node beat once, long ago
    looks = grid(1000, 1000 + 2 * TIMEOUT, 0.5)
    result = dict(zip(looks, verdicts(beats, looks, offset), strict=True))
    assert not any(v for t, v in result.items() if t < 1000 + TIMEOUT)
    assert result[1000 + TIMEOUT]


def test_fresh_credit_counts_a_first_seen_record_as_half_an_interval_old() -> None:
    """With fresh_credit (the joins' sweeps: keep_alive_interval / 2), a record first seen is that old already, and
    a changed one counts from the middle of the gap since the previous look, at most fresh_credit ago."""
    tracker = LivenessTracker(TIMEOUT, fresh_credit=2.5)
    tracker.observe({NODE: "a"}, 100.0, [NODE])
    assert tracker.age(NODE, 100.0) == 2.5
    assert not tracker.dead([NODE], 112.375) and tracker.dead([NODE], 112.5)  # timeout - interval / 2 of silence
    tracker.observe({NODE: "b"}, 102.0, [NODE])  # changed within a 2 s gap: written 1 s ago on average
    assert tracker.age(NODE, 102.0) == 1.0
    tracker.observe({NODE: "c"}, 110.0, [NODE])  # changed within an 8 s gap: at most fresh_credit ago
    assert tracker.age(NODE, 110.0) == 2.5
    beats = grid(0, 600, 5)
    looks = grid(0.25, 600, 2.5)
    live = LivenessTracker(TIMEOUT, fresh_credit=2.5)
    for t in looks:
        live.observe({NODE: str(tag_at(beats, t))}, t, [NODE])
        assert not live.dead([NODE], t), "a node beating every interval is never dead"


def test_node_never_seen_is_not_dead() -> None:
    tracker = LivenessTracker(TIMEOUT)
    assert tracker.dead([NODE], 1e9) == set()


def test_only_members_are_judged() -> None:
    tracker = LivenessTracker(TIMEOUT)
    tracker.observe({"a": "1", "b": "1"}, 0.0, ["a"])
    assert tracker.dead(["a", "b"], 100.0) == {"a"}


def test_missing_records() -> None:
    tracker = LivenessTracker(TIMEOUT)
    tags = {"a": "1"}
    assert tracker.missing(tags, ["a", "b", "c"]) == {"b", "c"}
    assert tracker.missing({}, []) == set()
    # A member that never wrote a record is judged like one whose record stopped changing.
    for t in grid(0, TIMEOUT, 2.5):
        tracker.observe(tags, t, ["a", "b"])
    assert tracker.dead(["a", "b"], TIMEOUT) == {"a", "b"}


def test_record_appearing_or_vanishing_is_a_change() -> None:
    tracker = LivenessTracker(TIMEOUT)
    tracker.observe({}, 0.0, [NODE])  # no record yet
    tracker.observe({NODE: "1"}, 5.0, [NODE])  # the first beat lands
    assert tracker.dead([NODE], 19.0) == set()
    tracker.observe({NODE: "1"}, 12.5, [NODE])
    tracker.observe({}, 19.0, [NODE])  # the record was deleted (a clean shutdown): reported as missing
    assert tracker.missing({}, [NODE]) == {NODE}
    assert tracker.dead([NODE], 19.0) == set()


def test_forget_starts_afresh() -> None:
    tracker = LivenessTracker(TIMEOUT)
    tracker.observe({"a": "1", "b": "1"}, 0.0, ["a", "b"])
    tracker.forget(["b"])
    tracker.observe({"a": "1", "b": "1"}, 7.0, ["a", "b"])
    assert tracker.dead(["a", "b"], 15.0) == {"b"}
    assert tracker.dead(["a", "b"], 22.0) == {"a", "b"}


def test_observers_blind_spell_is_not_counted_against_others() -> None:
    """If the observer itself could not look for longer than max_gap, only max_gap of that time counts."""
    tracker = LivenessTracker(TIMEOUT, max_gap=5.0)
    tracker.observe({NODE: "1"}, 0.0, [NODE])
    tracker.observe({NODE: "1"}, 60.0, [NODE])  # 60 s blind: only 5 s of the node's silence is held against it
    assert tracker.dead([NODE], 60.0) == set()
    for t in grid(62.5, 67.5, 2.5):
        tracker.observe({NODE: "1"}, t, [NODE])
    assert tracker.dead([NODE], 67.5) == set()
    tracker.observe({NODE: "1"}, 70.0, [NODE])
    assert tracker.dead([NODE], 70.0) == {NODE}


def test_an_observer_that_looks_slowly_still_detects_death() -> None:
    """Throttled by its read budget, an observer may look a little less often than max_gap: it must still call
    a silent node dead (counting max_gap per look), and never an advancing one."""
    tracker = LivenessTracker(0.6, max_gap=0.3)
    for i in range(40):
        tracker.observe({NODE: "1", "b": str(i)}, i * 0.31, [NODE, "b"])
    assert tracker.dead([NODE, "b"], 39 * 0.31) == {NODE}


def test_default_max_gap_is_half_the_timeout() -> None:
    assert LivenessTracker(TIMEOUT).max_gap == TIMEOUT / 2
    assert LivenessTracker(TIMEOUT, 9.0).max_gap == 9.0


# -- properties ------------------------------------------------------------------------------------------------------

eighths = st.integers(min_value=1, max_value=8 * 20).map(lambda n: n / 8)  # 0.125 .. 20 s


@settings(max_examples=150, deadline=None)
@given(
    interval=st.integers(1, 40).map(lambda n: n / 8),  # beats every 0.125 .. 5 s
    jitter=st.lists(st.integers(0, 3), min_size=2, max_size=20),
    cadence=st.integers(1, 20).map(lambda n: n / 8),  # looks every 0.125 .. 2.5 s
    start=st.integers(0, 8 * 1000).map(lambda n: n / 8),
    offset=st.sampled_from(OFFSETS) | eighths.map(lambda x: x * 180),
)
def test_beating_node_is_never_dead_under_any_offset(
    interval: float, jitter: list[int], cadence: float, start: float, offset: float
) -> None:
    """Heartbeats at most `timeout - 1` apart are never a death, whatever the observer's clock reads."""
    beats, t = [], start
    for j in jitter:
        t += interval + j * 0.125
        beats.append(t)
    gap = max(beats[i + 1] - beats[i] for i in range(len(beats) - 1))
    timeout = gap + 2 * cadence + 0.125  # enough to always see a change within it
    looks = grid(beats[0], beats[-1], cadence)
    reference = verdicts(beats, looks, 0.0, timeout=timeout, max_gap=timeout)
    assert not any(reference)
    assert verdicts(beats, looks, offset, timeout=timeout, max_gap=timeout) == reference


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 80), min_size=1, max_size=12),  # beats 0.125 .. 10 s apart (< timeout)
    cadence=st.integers(1, 20).map(lambda n: n / 8),
    offset_a=st.sampled_from(OFFSETS),
    offset_b=st.sampled_from(OFFSETS),
)  # fmt: skip
def test_same_verdicts_at_any_clock_offset(gaps: list[int], cadence: float, offset_a: float, offset_b: float) -> None:
    """Observers that look at the same moments reach the same verdicts, whatever their clocks read."""
    beats = [sum(gaps[: i + 1]) / 8 for i in range(len(gaps))]
    looks = grid(0.0, beats[-1] + 3 * TIMEOUT, cadence)
    a = verdicts(beats, looks, offset_a, max_gap=TIMEOUT / 2)
    assert a == verdicts(beats, looks, offset_b, max_gap=TIMEOUT / 2)
    # A node that stopped is found dead, within timeout + 2 looks of its last beat, and never before timeout.
    first_dead = next(t for t, dead in zip(looks, a, strict=True) if dead)
    assert beats[-1] + TIMEOUT <= first_dead + 1e-9 <= beats[-1] + TIMEOUT + 2 * cadence + 1e-9
    assert all(a[i] for i, t in enumerate(looks) if t >= first_dead)


# -- the keep-alive's schedule ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    interval=st.floats(0.05, 60),
    took=st.floats(0, 120),
    landed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_heartbeats_keep_a_fixed_schedule_and_a_failed_one_is_retried_soon(
    interval: float, took: float, landed: bool, seed: int
) -> None:
    """After a beat that landed, the next starts one interval after the previous one started (a slow write does not
    stretch the period), but never within a quarter interval; after a failed one, within 0.75 s and never later than
    1.5 intervals: a failure must not cost a whole interval on top of the time the failed write took."""
    import random

    from fsrdzv._keepalive import next_beat_in
    from fsrdzv._periods import BEAT_RETRY

    started = 1000.0
    wait = next_beat_in(interval, started, started + took, landed, random.Random(seed))
    if landed:
        assert wait >= interval / 4
        assert wait == pytest.approx(max(interval - took, interval / 4))
    else:
        assert 0 < wait <= 1.5 * min(interval, BEAT_RETRY)


def test_a_failed_heartbeat_is_retried_well_before_the_next_interval() -> None:
    """A real keep-alive thread (interval 1 s) whose first heartbeat write fails (after the node's own beat at
    start): the retry lands within about half a second, not a full interval later."""
    import time
    import uuid

    import fsrdzv
    from fsrdzv._errors import StorageError
    from fsrdzv._keepalive import Heartbeat, ThreadRuntime
    from fsrdzv._session import Session

    store = fsrdzv.open_store(f"memory://beat-{uuid.uuid4().hex[:8]}", "run")
    beats: list[tuple[float, bool]] = []
    real_put = store.put_record

    def flaky_put(kind: str, name: str, data: bytes) -> None:
        fail = kind == "hb" and len(beats) == 1
        beats.append((time.monotonic(), not fail))
        if fail:
            raise StorageError(5, "injected heartbeat failure")
        real_put(kind, name, data)

    store.put_record = flaky_put  # type: ignore[method-assign]
    heartbeat = Heartbeat(Session(store), "node", 1.0, ThreadRuntime(), time.monotonic)
    try:
        heartbeat.start()
        deadline = time.monotonic() + 5
        while len(beats) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        heartbeat.stop()
    assert [ok for _, ok in beats[:3]] == [True, False, True]
    assert beats[2][0] - beats[1][0] < 0.8
