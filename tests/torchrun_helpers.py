"""Launch real ``torchrun`` agents for the end-to-end tests, and make sure none outlives its test.

Every agent runs ``python -m torch.distributed.run`` in a new session (its own process group), so that a test can
SIGKILL a whole node (agent plus workers) at once, and the fixture kills every group it started when the test
ends, passed or failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
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

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def kill(self) -> None:
        """SIGKILL the whole node: the agent and its workers, as if the machine died."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        else:
            # The agent is gone but a worker might not be (it should never happen; kill the group anyway).
            self.kill()
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

    def start(
        self,
        name: str,
        *,
        nnodes: str,
        run_id: str,
        nproc: int = 2,
        max_restarts: int = 0,
        conf: str = FAST_CONF,
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
            "--local-addr=127.0.0.1",
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

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for agent in self.agents:
                code = agent.proc.poll()
                if code is not None and code != 0 and not getattr(agent, "expected_death", False):
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


@contextlib.contextmanager
def cluster(workdir: Path, endpoint: str, env: dict[str, str] | None = None) -> Iterator[Cluster]:
    c = Cluster(workdir, endpoint, env)
    try:
        yield c
    finally:
        c.stop()
