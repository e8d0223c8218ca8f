"""Harness for tests that run rendezvous nodes as real processes (tests/rdzv_node.py)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

NODE_SCRIPT = os.path.join(os.path.dirname(__file__), "rdzv_node.py")
#: Queued by the reader when the node's stdout ends: no further event can come.
_EOF = "__eof__"

#: Small timeouts so that liveness and last-call tests take seconds, not minutes.
FAST: dict[str, Any] = {
    "keep_alive_interval": 0.3,
    "keep_alive_max_attempt": 3,
    "last_call_timeout": 0.5,
    "join_timeout": 60,
    "close_timeout": 10,
}


class Node:
    """One node process; its JSON events are collected by a reader thread."""

    def __init__(
        self,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        *,
        addr: str = "127.0.0.1",
        rounds: int = 1,
        hold: float = 0.0,
        shutdown: bool = False,
        options: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        stop_file: str = "",
        clock_offset: float = 0.0,
    ) -> None:
        cmd = [
            sys.executable,
            NODE_SCRIPT,
            endpoint,
            run_id,
            str(min_nodes),
            str(max_nodes),
            "--addr",
            addr,
            "--rounds",
            str(rounds),
            "--hold",
            str(hold),
            "--options",
            json.dumps(options or {}),
            "--settings",
            json.dumps({**FAST, **(settings or {})}),
        ]
        if shutdown:
            cmd.append("--shutdown")
        if stop_file:
            cmd += ["--stop-file", stop_file]
        if clock_offset:
            cmd += ["--clock-offset", str(clock_offset)]
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            self._queue.put(event)
        self.proc.stdout.close()
        # End of output: the process exited (or closed stdout). wait_for stops waiting on it at once.
        self._queue.put({"event": _EOF})

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
        self.proc.stderr.close()

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """Return the next event called ``event`` (earlier events of other kinds are skipped)."""
        stop = time.monotonic() + timeout
        while True:
            left = stop - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {event!r} event within {timeout}s; events={self.events} stderr={self.stderr[-20:]}"
                )
            try:
                got = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if got["event"] == _EOF:
                self._queue.put(got)  # later waits fail at once too
                try:
                    code: int | None = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                time.sleep(0.1)  # let the stderr reader take the last lines
                raise AssertionError(
                    f"no {event!r} event: the node exited (code {code}) before sending it; "
                    f"events={self.events} stderr={self.stderr[-20:]}"
                )
            if got["event"] == event:
                return got

    def kill(self) -> None:
        with_suppress_kill(self.proc)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node did not exit; events={self.events} stderr={self.stderr[-20:]}") from None

    def ranks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "rank"]


def with_suppress_kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def check_round(ranks: list[dict[str, Any]], world: int) -> None:
    """Ranks of one round are dense, unique and agree on everything shared."""
    assert sorted(r["rank"] for r in ranks) == list(range(world)), ranks
    assert {r["world_size"] for r in ranks} == {world}
    assert len({tuple(r["master"]) for r in ranks}) == 1, ranks
    assert len({r["round"] for r in ranks}) == 1, ranks
    assert len({tuple(r["participants"]) for r in ranks}) == 1, ranks
