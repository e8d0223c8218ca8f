"""Launch real ``torchrun`` agents for the end-to-end tests, and make sure none outlives its test.

torch starts every worker in a session of its own, so killing an agent's process group leaves its workers running
(and still all-reducing with the other nodes). A "node death" here therefore freezes and kills the agent's whole
process tree, and every process of a test carries a tag in its environment by which the cleanup finds and kills
whatever is left, orphans included, when the test ends, passed or failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("torchrun_worker.py")
REPO = Path(__file__).resolve().parents[1]

#: Small settings so that formation, last call and failure detection take seconds, not minutes.
FAST_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120,close_timeout=10"


class Agent:
    """One torchrun process (one "node") and its log."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()/wait()
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(log_path.parent), start_new_session=True
        )
        self.started = time.monotonic()
        self.killed = False

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def kill(self) -> None:
        """SIGKILL the whole node: the agent and its workers, as if the machine died."""
        self.killed = True
        # Freeze first: an agent that saw its workers die would react, and a dead agent's workers get reparented.
        tree = [self.proc.pid, *_descendants(self.proc.pid)]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in tree:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class Cluster:
    """Starts agents for one test and stops all of them at the end."""

    def __init__(self, workdir: Path, endpoint: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.endpoint = endpoint
        self.out = workdir / "out"
        self.agents: list[Agent] = []
        self.env = dict(os.environ)
        # Python buffers output in pipes; unbuffered logs make failures readable. LOGLEVEL=INFO shows the agent's
        # decisions (restarts, rendezvous results) in the logs a failing test prints.
        self.env.update({"PYTHONUNBUFFERED": "1", "LOGLEVEL": "INFO", "OMP_NUM_THREADS": "1"})
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p)
        self.env.update(env or {})
        #: Inherited by every process of this cluster: the cleanup finds leftovers by it.
        self.tag = uuid.uuid4().hex
        self.env["FSRDZV_E2E_TAG"] = self.tag

    def start(
        self,
        name: str,
        *,
        nnodes: str,
        run_id: str,
        nproc: int = 2,
        max_restarts: int = 0,
        conf: str = FAST_CONF,
        local_addr: str = "127.0.0.1",
        worker_args: Sequence[str] = (),
    ) -> Agent:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=fsrdzv",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf={conf}",
            f"--local-addr={local_addr}",
            "--monitor-interval=0.1",
            f"--max-restarts={max_restarts}",
            str(WORKER),
            f"--out={self.out}",
            *worker_args,
        ]
        agent = Agent(name, argv, self.workdir / f"{name}.log", self.env)
        self.agents.append(agent)
        return agent

    def records(self) -> list[dict[str, Any]]:
        """What the workers wrote so far (one record per worker per attempt)."""
        if not self.out.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.out.glob("a*-w*-r*.json"))]

    def has(self, *, world: int, restart: int | None = None, count: int | None = None) -> bool:
        """Whether ``count`` (default: ``world``) workers reported from a world of ``world`` workers."""
        found = [r for r in self.records() if r["world"] == world and (restart is None or r["restart"] == restart)]
        return len(found) >= (world if count is None else count)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for agent in self.agents:
                code = agent.proc.poll()
                if code is not None and code != 0 and not agent.killed:
                    raise AssertionError(
                        f"agent {agent.name} exited with {code} while waiting for {what}\n{self.logs()}"
                    )
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def wait_all(self, agents: Sequence[Agent], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for agent in agents:
            try:
                codes.append(agent.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"agent {agent.name} did not finish within {timeout}s\n{self.logs()}") from None
        return codes

    def logs(self) -> str:
        return "\n".join(f"===== {a.name} (rc={a.proc.poll()}) =====\n{a.tail()}" for a in self.agents)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        for pid in _tagged(self.tag):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                # The command name (field 2) may contain spaces; the parent pid follows the closing parenthesis.
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _descendants(pid: int) -> list[int]:
    parents = _parents()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def _tagged(tag: str) -> list[int]:
    needle = f"FSRDZV_E2E_TAG={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    pids.append(int(entry))
    return pids


@contextlib.contextmanager
def cluster(workdir: Path, endpoint: str, env: dict[str, str] | None = None) -> Iterator[Cluster]:
    c = Cluster(workdir, endpoint, env)
    try:
        yield c
    finally:
        c.stop()
