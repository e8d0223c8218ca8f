"""Crashes: writers SIGKILLed in the middle of a compare-and-set, and rendezvous nodes SIGKILLed before, during and
after a round forms. Everything here uses real processes and real signals on a local directory.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import filelock
import pytest

import fsrdzv
from fsrdzv._state import decode_state
from tests.nodes import FAST, Node, check_round

WRITER = os.path.join(os.path.dirname(__file__), "crash_writer.py")

#: How many writer processes are SIGKILLed in the CAS test.
KILLS = 100


class _Lines:
    """Lines of a child's stdout, gathered by a reader thread."""

    def __init__(self, stream: Any) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))

    def next(self, timeout: float = 20.0) -> str:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from the writer server within {timeout}s") from None


def _state_file_generation(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(200).partition(b"\n")[0]
    for field in head.split(b" "):
        if field.startswith(b"gen="):
            return int(field[4:])
    raise AssertionError(f"no generation in the header of {path}: {head!r}")


def test_sigkill_writer_mid_cas_100_times(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL a writer doing CAS increments as fast as it can, 100 times, at random moments.

    After every kill: the document parses; its generation never goes back; every generation is exactly one
    increment (value == generation - 1, so no lost and no phantom update); the increments the writers confirmed
    plus the test's own, plus at most the one the killed writer had in flight (and only if the document shows
    exactly that value), equal the value; the lock is free at once (a kill never leaves it held: flock dies with
    the process), and the test's own next CAS wins promptly, without falling back to lock-less commits.
    """
    caplog.set_level(logging.WARNING, logger="fsrdzv")
    endpoint = str(tmp_path / "rdzv")
    rid = "crash-cas"
    store = fsrdzv.open_store(endpoint, rid)
    first = store.compare_and_set(b"0", None)
    assert first.won and first.snapshot is not None and first.snapshot.generation == 1
    run_dir = os.path.join(endpoint, rid)
    server = subprocess.Popen(
        [sys.executable, WRITER, endpoint, rid],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert server.stdin is not None
    lines = _Lines(server.stdout)
    rng = random.Random(20261124)
    confirmed = 0  # increments the writers reported as won
    own = 0  # increments made by this test after each kill
    committed_in_flight = 0  # kills after the commit point but before the writer could report it
    killed_inside_cas = 0  # kills between "try" and "won": the writer was inside compare_and_set
    state_behind_log = 0  # kills between link(2) of the log entry and the rename of ``state``
    slowest_next_cas = 0.0
    previous_generation = 1
    started = time.monotonic()
    try:
        assert lines.next() == "ready"
        for kill in range(KILLS):
            server.stdin.write("go\n")
            server.stdin.flush()
            tag, _, pid_text = lines.next().partition(" ")
            assert tag == "child", tag
            pid = int(pid_text)
            events: list[str] = []
            # Let it get going (a random number of confirmed increments), then kill at a random moment.
            want_wins = rng.randint(0, 4)
            while True:
                line = lines.next()
                events.append(line)
                if line.startswith("won") and sum(e.startswith("won") for e in events) >= want_wins:
                    break
                if line.startswith("start") and want_wins == 0:
                    break
            time.sleep(rng.uniform(0, 0.012))
            os.kill(pid, signal.SIGKILL)
            server.stdin.write(f"reap {pid}\n")
            server.stdin.flush()
            while True:
                line = lines.next()
                if line.startswith("reaped"):
                    assert line == f"reaped {pid} {int(signal.SIGKILL)}", line
                    break
                events.append(line)
            wins = [int(e.split()[1]) for e in events if e.startswith("won")]
            tries = [int(e.split()[1]) for e in events if e.startswith("try")]
            confirmed += len(wins)
            in_flight = tries[-1] if tries and (not wins or tries[-1] > wins[-1]) else None
            killed_inside_cas += in_flight is not None

            # The published ``state`` may lag behind the log (killed after the commit point): readers roll forward.
            file_generation = _state_file_generation(os.path.join(run_dir, "state"))
            snap = store.read()
            assert snap is not None, f"kill {kill}: the document vanished"
            value = int(snap.data)  # parses: the payload is exactly what some writer committed
            state_behind_log += file_generation < snap.generation
            assert snap.generation >= previous_generation, f"kill {kill}: generation went back"
            assert value == snap.generation - 1, f"kill {kill}: value {value} at generation {snap.generation}"
            if in_flight is not None and value == in_flight:
                committed_in_flight += 1
            assert value == confirmed + own + committed_in_flight, (
                f"kill {kill}: document says {value}, writers confirmed {confirmed}, test wrote {own}, "
                f"{committed_in_flight} in flight; events={events[-5:]}"
            )

            # No lock is left held: take it without waiting at all.
            probe = filelock.FileLock(os.path.join(run_dir, "lock"), timeout=0)
            probe.acquire()
            probe.release()
            # The next CAS succeeds promptly (a held lock would stall it for lock_timeout=10 s).
            t0 = time.monotonic()
            result = store.compare_and_set(str(value + 1).encode(), snap.token)
            slowest_next_cas = max(slowest_next_cas, time.monotonic() - t0)
            assert result.won, f"kill {kill}: the test's CAS after the kill lost"
            assert result.snapshot is not None
            own += 1
            previous_generation = result.snapshot.generation
        server.stdin.write("quit\n")
        server.stdin.flush()
        assert server.wait(20) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        server.stdin.close()
        if server.stdout is not None:
            server.stdout.close()
    final = store.read()
    assert final is not None
    assert int(final.data) == confirmed + own + committed_in_flight == final.generation - 1
    assert slowest_next_cas < 5.0
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()], "a CAS fell back to lock-less mode"
    leftovers = [n for d in (run_dir, os.path.join(run_dir, "log")) for n in os.listdir(d) if n.startswith(".tmp.")]
    print(
        f"\n{KILLS} SIGKILLs in {time.monotonic() - started:.1f}s: {killed_inside_cas} inside compare_and_set, "
        f"{committed_in_flight} after the commit point but before the reply, {state_behind_log} between the "
        f"log entry and the publication of 'state'; {confirmed} confirmed + {own} test increments + "
        f"{committed_in_flight} in flight = {int(final.data)} = generation {final.generation} - 1; "
        f"slowest next CAS {slowest_next_cas * 1000:.0f} ms; {len(leftovers)} orphaned temp files left"
    )
    # Most kills must land inside a CAS (6 ms of fsync'd work per CAS), or the test proves little.
    assert killed_inside_cas >= KILLS // 2, killed_inside_cas


# -- rendezvous nodes crashing ---------------------------------------------------------------------------------------


def _run_id() -> str:
    return "crash-" + uuid.uuid4().hex[:8]


def _state(endpoint: str, rid: str) -> Any:
    snap = fsrdzv.open_store(endpoint, rid).read()
    return None if snap is None else decode_state(snap.data, "test")


def _wait_state(endpoint: str, rid: str, predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _state(endpoint, rid)
        if state is not None and predicate(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"{what} not seen within {timeout}s; last state: {state}")


def _kill_all(nodes: list[Node]) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            n.kill()


def test_node_sigkilled_before_formation_is_removed_and_round_forms_without_it(tmp_path: Any) -> None:
    """min=max=3: A and B wait in the forming round; B is SIGKILLed. A's liveness sweep removes B (its heartbeat
    record stops changing), then C and D arrive and the round {A, C, D} forms with dense ranks. 1 crash."""
    endpoint = str(tmp_path / "rdzv")
    rid = _run_id()
    a = Node(endpoint, rid, 3, 3, addr="127.0.0.1")
    b = Node(endpoint, rid, 3, 3, addr="127.0.0.2")
    nodes = [a, b]
    try:
        ids = [a.wait_for("start")["node"], b.wait_for("start")["node"]]
        _wait_state(endpoint, rid, lambda s: set(ids) <= set(s.participants), 30, "A and B as participants")
        b.kill()
        killed = time.monotonic()
        _wait_state(endpoint, rid, lambda s: ids[1] not in s.members(), 30, "B removed")
        removed_after = time.monotonic() - killed
        c = Node(endpoint, rid, 3, 3, addr="127.0.0.3")
        d = Node(endpoint, rid, 3, 3, addr="127.0.0.4")
        nodes += [c, d]
        ranks = [n.wait_for("rank", 60) for n in (a, c, d)]
        check_round(ranks, 3)
        assert "127.0.0.2" not in ranks[0]["participants"]
        timeout = FAST["keep_alive_interval"] * FAST["keep_alive_max_attempt"]
        assert removed_after >= timeout * 0.5, f"B removed after {removed_after:.2f}s, before its timeout"
        print(f"\ncrashed waiting node removed {removed_after:.2f}s after SIGKILL (timeout {timeout:g}s)")
    finally:
        _kill_all(nodes)


def test_node_sigkilled_during_formation_is_left_out_of_the_round(tmp_path: Any) -> None:
    """min=2, max=4, last call 5 s: A and B are in the last call when C starts joining and is SIGKILLed at a random
    moment of its join (before or after its request was folded). The round completes with exactly {A, B}: a node
    folded in and then dead is removed before the last call ends. 1 crash."""
    endpoint = str(tmp_path / "rdzv")
    rid = _run_id()
    settings = {"last_call_timeout": 5.0}
    a = Node(endpoint, rid, 2, 4, addr="127.0.0.1", settings=settings)
    b = Node(endpoint, rid, 2, 4, addr="127.0.0.2", settings=settings)
    nodes = [a, b]
    try:
        _wait_state(endpoint, rid, lambda s: len(s.participants) == 2 and s.last_call is not None, 30, "last call")
        c = Node(endpoint, rid, 2, 4, addr="127.0.0.3", settings=settings)
        nodes.append(c)
        c.wait_for("joining")
        time.sleep(random.uniform(0, 0.3))
        c.kill()
        folded = False
        deadline = time.monotonic() + 30
        while not any(e["event"] == "rank" for e in a.events) and time.monotonic() < deadline:
            state = _state(endpoint, rid)
            folded |= state is not None and any(state.nodes[n].addr == "127.0.0.3" for n in state.members())
            time.sleep(0.05)
        ranks = [a.wait_for("rank", 30), b.wait_for("rank", 30)]
        check_round(ranks, 2)
        assert ranks[0]["participants"] == ["127.0.0.1", "127.0.0.2"]
        print(f"\nnode killed during its join ({'after' if folded else 'before'} its request was folded) left out")
    finally:
        _kill_all(nodes)


def test_node_sigkilled_after_formation_next_round_forms_without_it(tmp_path: Any) -> None:
    """Round 0 of {A, B, C} forms; A and B re-join at once (as agents whose workers failed) and wait; C is SIGKILLed.
    C is declared dead, the round advances and round 1 is {A, B} with dense ranks; A and B are never removed. 1 crash.
    """
    endpoint = str(tmp_path / "rdzv")
    rid = _run_id()
    a = Node(endpoint, rid, 2, 3, addr="127.0.0.1", rounds=2)
    b = Node(endpoint, rid, 2, 3, addr="127.0.0.2", rounds=2)
    c = Node(endpoint, rid, 2, 3, addr="127.0.0.3", hold=120)
    nodes = [a, b, c]
    try:
        round0 = [n.wait_for("rank", 60) for n in nodes]
        check_round(round0, 3)
        ids = {n.events[0]["node"] for n in (a, b)}
        _wait_state(endpoint, rid, lambda s: ids <= set(s.wait_list), 30, "A and B waiting for round 1")
        c.kill()
        round1 = [a.wait_for("rank", 60), b.wait_for("rank", 60)]
        check_round(round1, 2)
        assert round1[0]["round"] == 1
        assert round1[0]["participants"] == ["127.0.0.1", "127.0.0.2"]
        for n in (a, b):
            assert n.wait(30) == 0
    finally:
        _kill_all(nodes)
