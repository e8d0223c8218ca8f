"""``fsrdzv demo``: an elastic job on a temporary directory, told as a timeline.

It starts ``nodes`` real ``fsrdzv run`` processes (each runs a tiny Python worker that prints its rank and waits
for a stop file), and a watcher thread that reads the rendezvous document the way ``fsrdzv status`` does. Then:

1. formation: the first round completes with every node;
2. failure: one node (launcher and worker) is killed with SIGKILL; the others notice that its heartbeat record
   stopped changing, stop their workers and re-form without it;
3. scale-up: a new node starts; the others see it waiting, stop their workers and re-form with it;
4. finish: the workers are told to exit 0; the launchers close the run and exit 0.

Small timeouts keep it to a few seconds: keep-alive 0.3 s (dead after 0.9 s), last call 1 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Final

from ._errors import RendezvousError
from ._state import RendezvousState
from ._status import read_state
from ._stores import open_store

__all__ = ["run_demo"]

KEEP_ALIVE: Final = 0.3
LAST_CALL: Final = 1.0
#: Longest wait for any one step before the demo gives up (s); the steps take one or two seconds.
STEP_TIMEOUT: Final = 45.0
RUN_ID: Final = "demo"

_WORKER: Final = (
    "import os, sys, time\n"
    "e = os.environ\n"
    "print('worker started: rank %s of %s, round %s, master %s:%s' % (e['RANK'], e['WORLD_SIZE'], "
    "e['FSRDZV_ROUND'], e['MASTER_ADDR'], e['MASTER_PORT']), flush=True)\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.05)\n"
    "print('worker finished', flush=True)\n"
)


@dataclass
class _Node:
    label: str
    proc: subprocess.Popen[str]
    readers: list[threading.Thread]


class _Demo:
    def __init__(self, nodes: int, verbose: bool, out: IO[str]) -> None:
        self.count = nodes
        self.verbose = verbose
        self.out = out
        self.tmp = tempfile.mkdtemp(prefix="fsrdzv-demo-")
        self.endpoint = os.path.join(self.tmp, "rdzv")
        os.mkdir(self.endpoint)
        self.stop_file = os.path.join(self.tmp, "stop")
        self.min_nodes = max(1, nodes - 1)
        self.max_nodes = nodes + 1
        self.nodes: list[_Node] = []
        self.labels: dict[int, str] = {}  # launcher pid -> label (the pid is part of each node's identity)
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.state: RendezvousState | None = None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="fsrdzv-demo-watch", daemon=True)

    # -- output --------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def emit(self, text: str, who: str = "") -> None:
        with self._lock:
            self.out.write(f"{self.elapsed():7.2f}s  {who + '  ' if who else ''}{text}\n")
            self.out.flush()

    def _label(self, state: RendezvousState, node_id: str) -> str:
        info = state.nodes.get(node_id)
        return "?" if info is None else self.labels.get(info.pid, f"pid{info.pid}")

    # -- processes -----------------------------------------------------------------------------------------

    def start_node(self) -> _Node:
        label = f"node{len(self.nodes) + 1}"
        argv = [
            sys.executable, "-m", "fsrdzv", "run",
            "--endpoint", self.endpoint, "--run-id", RUN_ID,
            "--nnodes", f"{self.min_nodes}:{self.max_nodes}",
            "--local-addr", "127.0.0.1",
            "--keep-alive-interval", str(KEEP_ALIVE), "--keep-alive-max-attempt", "3",
            "--last-call-timeout", str(LAST_CALL), "--join-timeout", "60",
            "--monitor-interval", "0.2", "--stop-timeout", "2",
            "--", sys.executable, "-c", _WORKER, self.stop_file,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,  # a Ctrl-C on the demo must not reach the nodes: the demo stops them itself
        )
        self.labels[proc.pid] = label
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            threading.Thread(target=self._read, args=(label, proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(label, proc.stderr, False), daemon=True),
        ]
        for r in readers:
            r.start()
        node = _Node(label, proc, readers)
        self.nodes.append(node)
        return node

    def _read(self, label: str, stream: IO[str], worker: bool) -> None:
        for raw in stream:
            line = raw.rstrip()
            if not line:
                continue
            if worker:
                self.emit(line, label)
            elif self.verbose or "re-forming" in line or " error" in line.lower() or "traceback" in line.lower():
                # Launcher logs carry their own clock time; keep only the message.
                self.emit("launcher: " + line.split("fsrdzv run: ", 1)[-1], label)

    # -- the watcher ---------------------------------------------------------------------------------------

    def _watch(self) -> None:
        store = open_store(self.endpoint, RUN_ID)
        seen: tuple[int, bool, bool, tuple[str, ...]] | None = None
        while not self._stop.is_set():
            try:
                state = read_state(store)
            except RendezvousError:
                state = None
            if state is not None:
                key = (state.round, state.complete, state.closed, tuple(sorted(state.wait_list)))
                if key != seen:
                    self._report(state, seen)
                    seen = key
                with self._changed:
                    self.state = state
                    self._changed.notify_all()
            self._stop.wait(0.05)

    def _report(self, state: RendezvousState, seen: tuple[int, bool, bool, tuple[str, ...]] | None) -> None:
        if state.closed:
            self.emit("run closed")
            return
        if state.complete and (seen is None or seen[0] != state.round or not seen[1]):
            ranks = sorted(state.participants.items(), key=lambda kv: kv[1])
            members = " ".join(f"rank{r}={self._label(state, n)}" for n, r in ranks)
            self.emit(f"round {state.round} complete: {len(ranks)} nodes  {members}")
        waiting = sorted(self._label(state, n) for n in state.wait_list)
        if waiting and (seen is None or set(seen[3]) != set(state.wait_list)):
            self.emit(f"waiting to join round {state.round + 1}: {' '.join(waiting)}")

    def wait_for(self, what: str, predicate: Callable[[RendezvousState], bool]) -> RendezvousState:
        deadline = time.monotonic() + STEP_TIMEOUT
        with self._changed:
            while True:
                if self.state is not None and predicate(self.state):
                    return self.state
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} did not happen within {STEP_TIMEOUT:g}s")
                self._changed.wait(min(left, 0.2))

    # -- the story -----------------------------------------------------------------------------------------

    def run(self) -> int:
        out = self.out
        out.write(
            f"fsrdzv demo: {self.count} local nodes, endpoint {self.endpoint} (a temporary directory), run {RUN_ID!r}, "
            f"--nnodes {self.min_nodes}:{self.max_nodes}\n"
            f"  keep-alive {KEEP_ALIVE:g}s (a node is dead after {3 * KEEP_ALIVE:g}s without a heartbeat change), "
            f"last call {LAST_CALL:g}s\n\n"
        )
        self._watcher.start()
        for _ in range(self.count):
            self.start_node()
        self.emit("started " + " ".join(n.label for n in self.nodes))
        first = self.wait_for(
            "the first round", lambda s: s.complete and len(s.participants) == self.count and not s.wait_list
        )
        formed = self.elapsed()

        victim = self.nodes[1]
        time.sleep(0.5)  # let the workers print that they started
        killed_at = self.elapsed()
        self.emit(f"kill -9 {victim.label} (its launcher; the worker dies with it)")
        os.kill(victim.proc.pid, signal.SIGKILL)
        second = self.wait_for(
            "re-formation without the killed node",
            lambda s: s.complete and s.round > first.round and len(s.participants) == self.count - 1,
        )
        reformed = self.elapsed()

        time.sleep(0.5)
        added_at = self.elapsed()
        newcomer = self.start_node()
        self.emit(f"started {newcomer.label}")
        self.wait_for(
            "scale-up with the new node",
            lambda s: s.complete and s.round > second.round and len(s.participants) == self.count,
        )
        scaled = self.elapsed()

        time.sleep(0.5)
        self.emit("asking the workers to finish (they exit 0, the launchers close the run)")
        with open(self.stop_file, "w"):
            pass
        self.wait_for("the run closing", lambda s: s.closed)
        codes = {}
        for node in self.nodes:
            if node is victim:
                continue
            codes[node.label] = node.proc.wait(timeout=STEP_TIMEOUT)
            self.emit(f"exited {codes[node.label]}", node.label)
        for node in self.nodes:
            for r in node.readers:
                r.join(timeout=5)
        total = self.elapsed()
        ok = all(code == 0 for code in codes.values())
        out.write(
            "\nsummary\n"
            f"  formation     {formed:5.2f}s  {self.count} nodes from a cold start\n"
            f"  re-formation  {reformed - killed_at:5.2f}s  after SIGKILL of {victim.label} (detection + last call)\n"
            f"  scale-up      {scaled - added_at:5.2f}s  after {newcomer.label} started (its start-up + last call)\n"
            f"  total         {total:5.2f}s  exit statuses: " + " ".join(f"{k}={v}" for k, v in codes.items()) + "\n"
        )
        return 0 if ok else 1

    def cleanup(self, keep: bool) -> None:
        self._stop.set()
        for node in self.nodes:
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait()
            for stream in (node.proc.stdout, node.proc.stderr):
                if stream is not None:
                    stream.close()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        if keep:
            self.out.write(f"kept {self.tmp}\n")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_demo(nodes: int = 4, *, keep: bool = False, verbose: bool = False, out: IO[str] | None = None) -> int:
    """Run the demo and return 0 when every step happened and every remaining node exited 0."""
    demo = _Demo(nodes, verbose, out or sys.stdout)
    try:
        return demo.run()
    except TimeoutError as exc:
        sys.stderr.write(f"fsrdzv demo: error: {exc}; rerun with --verbose to see the launchers' logs\n")
        return 1
    finally:
        demo.cleanup(keep)
