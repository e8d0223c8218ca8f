"""Issue 15 §3: a waiting node says what it waits for; the expected roster; nodes with other settings fail at once."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest

import fsrdzv
from fsrdzv._admin import RunAdmin
from fsrdzv._roster import expand_nodelist, expected_nodes
from fsrdzv.testing import FakeClock
from tests.nodes import FAST


def _endpoint() -> str:
    return f"memory://progress-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu5,node[8-10]", ["gpu5", "node8", "node9", "node10"]),
        ("a[1-2]-b[01-02]", ["a1-b01", "a1-b02", "a2-b01", "a2-b02"]),
        ("solo", ["solo"]),
    ],
)
def test_slurm_nodelist_expansion(text: str, names: list[str]) -> None:
    assert expand_nodelist(text) == names


def test_expected_roster_from_slurm_or_explicit() -> None:
    env = {"SLURM_JOB_NODELIST": "n[1-3]"}
    assert expected_nodes(None, env) == ("n1", "n2", "n3")
    assert expected_nodes(["x[1-2]", "y"], env) == ("x1", "x2", "y")
    assert expected_nodes(None, {}) == ()
    with pytest.raises(fsrdzv.ConfigurationError, match="node range"):
        expand_nodelist("n[3-1]")


def test_progress_line_every_10s_then_the_missing_nodes_and_the_timeout_names_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    handler = fsrdzv.create_handler(
        _endpoint(),
        "job-42",
        2,
        4,
        local_addr="10.0.0.1",
        join_timeout=90,
        clock=clock,
        sleep=clock.sleep,
        expected_nodes=["node[01-03]"],
        **{k: v for k, v in FAST.items() if k != "join_timeout"},
    )
    with (
        caplog.at_level(logging.INFO, logger="fsrdzv.progress"),
        pytest.raises(fsrdzv.RendezvousTimeoutError) as info,
    ):
        handler.next_rendezvous()
    lines = [r.getMessage() for r in caplog.records if r.name == "fsrdzv.progress"]
    assert lines, "no progress line in 90 s of waiting"
    assert lines[0] == "waiting for run 'job-42' round 0: 1 of 2 nodes (max 4)", lines[0]
    assert 8 <= len(lines) <= 10, lines  # one every 10 s
    assert all("missing" not in line for line in lines[:5])
    # The node's own host is not node01..03: all three are missing, never seen.
    assert "missing 3 of 3 expected: node01 (never seen), node02 (never seen), node03 (never seen)" in lines[-1]
    assert "node01 (never seen)" in str(info.value) and "\n" not in str(info.value)


def test_progress_line_shows_the_last_call(caplog: pytest.LogCaptureFixture) -> None:
    ep = _endpoint()
    settings = {**FAST, "last_call_timeout": 11.0}
    handlers = [fsrdzv.create_handler(ep, "job-7", 2, 4, local_addr=f"10.0.0.{i}", **settings) for i in (1, 2)]
    done: list[fsrdzv.RendezvousInfo] = []
    with caplog.at_level(logging.INFO, logger="fsrdzv.progress"):
        threads = [threading.Thread(target=lambda h=h: done.append(h.next_rendezvous())) for h in handlers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(done) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "fsrdzv.progress"]
    assert any(
        line.startswith("waiting for run 'job-7' round 0: 2 of 2 nodes (max 4); last call ends in ") for line in lines
    ), lines
    for h in handlers:
        h.shutdown()


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        ({"min_nodes": 3}, "min_nodes=3 on this node, min_nodes=2 in the run"),
        ({"max_nodes": 3}, "max_nodes=3 on this node, max_nodes=4 in the run"),
        ({"last_call_timeout": 7.0}, "last_call_timeout=7s on this node, last_call_timeout=1s in the run"),
    ],
)
def test_a_node_with_other_settings_fails_at_once(other: dict[str, float], fragment: str) -> None:
    ep = _endpoint()
    base = {**FAST, "last_call_timeout": 1.0, "join_timeout": 30.0}
    first = fsrdzv.create_handler(ep, "mixed", 2, 4, local_addr="10.0.0.1", **base)
    outcome: list[BaseException] = []

    def wait_first() -> None:
        try:
            first.next_rendezvous()
        except fsrdzv.RendezvousError as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=wait_first, daemon=True)
    waiting.start()
    deadline = time.monotonic() + 10
    while first.store.read() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    low, high = int(other.pop("min_nodes", 2)), int(other.pop("max_nodes", 4))
    second = fsrdzv.create_handler(ep, "mixed", low, high, local_addr="10.0.0.2", **{**base, **other})
    start = time.monotonic()
    with pytest.raises(fsrdzv.ConfigurationError) as info:
        second.next_rendezvous()
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    # It took itself out: the first node is alone in the document.
    state = RunAdmin(first.store).read()
    assert state is not None and set(state.participants) == {first.node_id}
    RunAdmin(first.store).close(5)  # not first.set_closed(): its join holds the handler's lock
    waiting.join(10)
    first.shutdown()
