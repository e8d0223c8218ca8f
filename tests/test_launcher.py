"""``fsrdzv run`` with real processes: ranks and environment, re-formation after SIGKILL, restarts, exit codes,
signal forwarding.

Every node is the real console script (``python -m fsrdzv run``) running a small worker script that appends one
JSON line per start to its own log, so the tests read what each command saw. Timeouts are small (keep-alive 0.5 s,
so a node is dead after 1.5 s; last call 0.5 s) to keep the whole file to a few seconds per test.
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

import pytest

from fsrdzv import open_store
from fsrdzv._state import RendezvousState, request_owner
from fsrdzv._status import read_state

#: Small timeouts for every launcher in the tests.
FAST = (
    "--keep-alive-interval", "0.5", "--last-call-timeout", "0.5", "--monitor-interval", "0.2",
    "--stop-timeout", "3", "--join-timeout", "60", "--local-addr", "127.0.0.1",
)  # fmt: skip

WORKER = """\
import json, os, signal, sys, time
log, stop, mode = sys.argv[1], sys.argv[2], sys.argv[3]
keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FSRDZV_ROUND", "FSRDZV_RUN_ID",
        "FSRDZV_RESTART_COUNT", "FSRDZV_NODE_ID", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
def write(event, **extra):
    record = {k: os.environ.get(k) for k in keys}
    record.update(event=event, pid=os.getpid(), **extra)
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\\n")
write("start")
if mode == "exit0":
    sys.exit(0)
if mode == "fail":
    sys.exit(7)
if mode == "fail-first" and os.environ["FSRDZV_RESTART_COUNT"] == "0":
    sys.exit(3)
if mode == "sigkill-self":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "trap":
    def on_signal(signum, frame):
        write("signal", signum=signum)
        sys.exit(40 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
while not os.path.exists(stop):
    time.sleep(0.05)
write("finish")
"""


def fsrdzv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fsrdzv", *args]


class Job:
    """Launcher processes of one run, each with its own worker log."""

    def __init__(self, root: Path, endpoint: str, run_id: str = "job", options: Sequence[str] = ()) -> None:
        self.root = root
        self.endpoint = endpoint
        self.run_id = run_id
        self.options = list(options)
        self.stop_file = root / "stop"
        self.worker = root / "worker.py"
        self.worker.write_text(WORKER)
        self.procs: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        self._stderr: dict[int, str] = {}

    def start(self, nnodes: str, mode: str = "wait", *extra: str, env: dict[str, str] | None = None) -> int:
        """Start one node; return its index."""
        index = len(self.procs)
        log = self.root / f"node{index}.jsonl"
        argv = fsrdzv(
            "run", "--endpoint", self.endpoint, "--run-id", self.run_id, "--nnodes", nnodes, *FAST, *extra,
            *self.options, "--", sys.executable, str(self.worker), str(log), str(self.stop_file), mode,
        )  # fmt: skip
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        self.procs.append(proc)
        self.logs.append(log)
        return index

    def records(self, index: int) -> list[dict[str, Any]]:
        try:
            text = self.logs[index].read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def starts(self, index: int) -> list[dict[str, Any]]:
        return [r for r in self.records(index) if r["event"] == "start"]

    def wait(self, index: int, timeout: float = 60) -> int:
        return self.procs[index].wait(timeout=timeout)

    def stderr(self, index: int) -> str:
        """The launcher's stderr, once it has exited (read once, then cached)."""
        if index not in self._stderr:
            proc = self.procs[index]
            assert proc.poll() is not None
            self._stderr[index] = proc.stderr.read() if proc.stderr else ""
        return self._stderr[index]

    def finish(self) -> None:
        self.stop_file.write_text("")

    def state(self, storage_options: dict[str, Any] | None = None) -> RendezvousState | None:
        return read_state(open_store(self.endpoint, self.run_id, storage_options=storage_options))

    def cleanup(self) -> None:
        self.finish()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, the killed launcher, is gone: init reaps it soon).
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
    return True


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    endpoint = tmp_path / "rdzv"
    endpoint.mkdir()
    j = Job(tmp_path, str(endpoint))
    try:
        yield j
    finally:
        j.cleanup()


def test_ranks_and_environment_of_three_nodes(job: Job) -> None:
    nodes = [job.start("3", "exit0") for _ in range(3)]
    codes = [job.wait(i) for i in nodes]
    assert codes == [0, 0, 0], [job.stderr(i) for i in nodes]
    seen = [job.starts(i)[0] for i in nodes]
    assert sorted(int(r["RANK"]) for r in seen) == [0, 1, 2]
    assert {r["WORLD_SIZE"] for r in seen} == {"3"}
    assert {(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in seen} == {("127.0.0.1", seen[0]["MASTER_PORT"])}
    assert int(seen[0]["MASTER_PORT"]) > 0
    assert len({r["FSRDZV_ROUND"] for r in seen}) == 1
    assert {r["FSRDZV_RUN_ID"] for r in seen} == {"job"}
    assert {r["LOCAL_RANK"] for r in seen} == {"0"} and {r["LOCAL_WORLD_SIZE"] for r in seen} == {"1"}
    assert all(r["GROUP_RANK"] == r["RANK"] for r in seen)
    assert len({r["FSRDZV_NODE_ID"] for r in seen}) == 3
    state = job.state()
    assert state is not None and state.closed, "a command that succeeds closes the run"
    assert "round" in job.stderr(0) and "closing run" in job.stderr(0)


def test_survivors_reform_after_sigkill_of_one_node(job: Job) -> None:
    nodes = [job.start("2:3") for _ in range(3)]
    wait_until("three workers", lambda: all(job.starts(i) for i in nodes))
    first_round = {job.starts(i)[0]["FSRDZV_ROUND"] for i in nodes}
    assert len(first_round) == 1 and {job.starts(i)[0]["WORLD_SIZE"] for i in nodes} == {"3"}
    victim, survivors = nodes[1], [nodes[0], nodes[2]]
    victim_worker = job.starts(victim)[0]["pid"]
    job.procs[victim].send_signal(signal.SIGKILL)
    job.wait(victim)
    # PR_SET_PDEATHSIG: the worker of a killed launcher does not live on.
    wait_until("the killed node's worker to die", lambda: not pid_alive(victim_worker), timeout=10)

    def reformed() -> bool:
        return all(len(job.starts(i)) >= 2 and job.starts(i)[-1]["WORLD_SIZE"] == "2" for i in survivors)

    wait_until("the survivors to re-form as two", reformed)
    second = [job.starts(i)[-1] for i in survivors]
    assert sorted(int(r["RANK"]) for r in second) == [0, 1]
    assert len({r["FSRDZV_ROUND"] for r in second}) == 1
    assert int(second[0]["FSRDZV_ROUND"]) > int(first_round.pop())
    assert {r["FSRDZV_RESTART_COUNT"] for r in second} == {"0"}, "membership changes do not use restarts"
    # Removed with its records (RunAdmin.remove_dead): the crashed node's request can never be folded again.
    dead_id = job.starts(victim)[0]["FSRDZV_NODE_ID"]
    store = open_store(job.endpoint, job.run_id)
    assert dead_id not in store.list_records("hb")
    assert dead_id not in {request_owner(name) for name in store.list_records("req")}
    job.finish()
    assert [job.wait(i) for i in survivors] == [0, 0]
    assert "stopped heartbeating" in job.stderr(survivors[0]) + job.stderr(survivors[1])


def test_failed_command_is_restarted_and_can_succeed(job: Job) -> None:
    nodes = [job.start("2", "fail-first", "--max-restarts", "2") for _ in range(2)]

    def both_restarted_together() -> bool:
        last = [job.starts(i)[-1] if job.starts(i) else {} for i in nodes]
        return (
            all(r.get("FSRDZV_RESTART_COUNT") == "1" for r in last)
            and last[0]["FSRDZV_ROUND"] == last[1]["FSRDZV_ROUND"]
        )

    wait_until("both nodes to run their first restart in one round", both_restarted_together)
    job.finish()
    assert [job.wait(i) for i in nodes] == [0, 0], [job.stderr(i) for i in nodes]
    for i in nodes:
        assert job.starts(i)[0]["FSRDZV_RESTART_COUNT"] == "0"
    err = job.stderr(0)
    assert "failed with 3: restart 1 of 2" in err


def test_exit_code_is_the_commands_after_the_last_restart(job: Job) -> None:
    node = job.start("1", "fail", "--max-restarts", "1")
    assert job.wait(node) == 7
    assert [r["FSRDZV_RESTART_COUNT"] for r in job.starts(node)] == ["0", "1"]
    state = job.state()
    assert state is not None and state.closed, "a final failure closes the run, as torch does"


def test_death_by_signal_is_128_plus_the_signal(job: Job) -> None:
    node = job.start("1", "sigkill-self")
    assert job.wait(node) == 128 + signal.SIGKILL


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_and_the_run_stays_open(job: Job, signum: int) -> None:
    node = job.start("1", "trap")
    wait_until("the worker", lambda: bool(job.starts(node)))
    time.sleep(0.3)  # the worker installs its handlers right after logging its start
    job.procs[node].send_signal(signum)
    assert job.wait(node) == 40 + signum
    events = [r for r in job.records(node) if r["event"] == "signal"]
    assert [e["signum"] for e in events] == [signum], "forwarded exactly once"
    state = job.state()
    assert state is not None and not state.closed, "a signal leaves the run open for the other nodes"


def test_signal_while_joining_exits_at_once(job: Job) -> None:
    node = job.start("2")  # nobody else comes
    wait_until("the join", lambda: (state := job.state()) is not None and bool(state.participants))
    start = time.monotonic()
    job.procs[node].send_signal(signal.SIGTERM)
    assert job.wait(node, timeout=15) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 5
    assert "Traceback" not in job.stderr(node)
    assert job.starts(node) == []


def test_a_new_node_makes_the_others_reform(job: Job) -> None:
    nodes = [job.start("1:3") for _ in range(2)]
    wait_until("two workers in one round", lambda: all(job.starts(i) for i in nodes))
    assert {job.starts(i)[0]["WORLD_SIZE"] for i in nodes} <= {"1", "2"}
    wait_until("a round of two", lambda: all(job.starts(i)[-1]["WORLD_SIZE"] == "2" for i in nodes))
    newcomer = job.start("1:3")
    everyone = [*nodes, newcomer]
    wait_until(
        "scale-up to three",
        lambda: all(job.starts(i) and job.starts(i)[-1]["WORLD_SIZE"] == "3" for i in everyone),
    )
    assert sorted(int(job.starts(i)[-1]["RANK"]) for i in everyone) == [0, 1, 2]
    job.finish()
    assert [job.wait(i) for i in everyone] == [0, 0, 0]
    assert "node(s) waiting to join" in job.stderr(nodes[0])


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    ep = ["--endpoint", str(tmp_path)]
    cases = [
        (["run", *ep, "--run-id", "x", "--nnodes", "2"], 2),  # no command
        (["run", *ep, "--run-id", "x", "--nnodes", "3:1", "--", "true"], 2),
        (["run", *ep, "--run-id", "x", "--nnodes", "1", "--", "no-such-program-xyz"], 127),
        (["run", "--run-id", "x", "--nnodes", "1", "--", "true"], 2),  # no endpoint
        (["run", *ep, "--nnodes", "1", "--", "true"], 2),  # no run id
        (["run", *ep, "--run-id", "x", "--nnodes", "1", "--keep-alive-interval", "0", "--", "true"], 2),
        (["run", "--endpoint", "ftp://x/y", "--run-id", "x", "--nnodes", "1", "--", "true"], 2),
    ]
    env = {k: v for k, v in os.environ.items() if k not in {"FSRDZV_ENDPOINT", "SLURM_JOB_ID", "FSRDZV_RUN_ID"}}
    # All at once: each is a fresh interpreter, and these do not interact.
    procs = [subprocess.Popen(fsrdzv(*a), stderr=subprocess.PIPE, text=True, env=env) for a, _ in cases]
    for (argv, code), proc in zip(cases, procs, strict=True):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("fsrdzv"), (argv, err)


def test_slurm_defaults(job: Job) -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "FSRDZV_ENDPOINT": job.endpoint}
    argv = fsrdzv("run", *FAST, "--", sys.executable, str(job.worker), str(job.root / "s.jsonl"), "x", "exit0")
    result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    record = json.loads((job.root / "s.jsonl").read_text())
    assert record["FSRDZV_RUN_ID"] == "4242" and record["WORLD_SIZE"] == "1"


# -- --nproc-per-node: torchrun's worker environment (issue 14 §2) ------------------------------------------

#: torchrun's worker variables whose values fsrdzv run must match (the addresses, ports and run ids differ).
TORCHRUN_SAME = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "OMP_NUM_THREADS",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)  # fmt: skip
TORCHRUN_PRESENT = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")

ENV_DUMP = """\
import json, os, sys
keys = {keys!r}
with open(os.path.join(sys.argv[1], "env-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{k: os.environ.get(k) for k in keys}}, f)
"""


def _env_dumps(out: Path) -> dict[str, dict[str, str | None]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("env-*.json"))}


def test_nproc_per_node_matches_torchruns_worker_environment(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    script = tmp_path / "dump.py"
    script.write_text(ENV_DUMP.format(keys=(*TORCHRUN_SAME, *TORCHRUN_PRESENT)))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING")}
    theirs, ours = tmp_path / "torchrun", tmp_path / "fsrdzv"
    theirs.mkdir()
    ours.mkdir()
    (tmp_path / "rdzv").mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=2"]
    subprocess.run([*torchrun, str(script), str(theirs)], env=env, check=True, capture_output=True, timeout=120)
    argv = fsrdzv(
        "run", "--endpoint", str(tmp_path / "rdzv"), "--run-id", "envs", "--nnodes", "1", "--nproc-per-node", "2",
        "--max-restarts", "2", *FAST, "--", sys.executable, str(script), str(ours),
    )  # fmt: skip
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)
    torch_envs, our_envs = _env_dumps(theirs), _env_dumps(ours)
    assert sorted(torch_envs) == sorted(our_envs) == ["env-0", "env-1"]
    for name, torch_env in torch_envs.items():
        assert {k: our_envs[name][k] for k in TORCHRUN_SAME} == {k: torch_env[k] for k in TORCHRUN_SAME}
        assert all(our_envs[name][k] for k in TORCHRUN_PRESENT), our_envs[name]
    assert {e["TORCHELASTIC_RUN_ID"] for e in our_envs.values()} == {"envs"}
    # No agent store under fsrdzv run: worker rank 0 binds MASTER_PORT itself (torch's env:// reads this).
    assert {e["TORCHELASTIC_USE_AGENT_STORE"] for e in our_envs.values()} == {"False"}


def test_gloo_job_of_two_nodes_by_two_processes(tmp_path: Path) -> None:
    """A real torch.distributed job (init_method env://, gloo): 2 nodes x 2 processes, all-reduce correct."""
    pytest.importorskip("torch")
    (tmp_path / "rdzv").mkdir()
    out = tmp_path / "out"
    worker = Path(__file__).with_name("torchrun_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = fsrdzv(
        "run", "--endpoint", str(tmp_path / "rdzv"), "--run-id", "gloo", "--nnodes", "2", "--nproc-per-node", "2",
        *FAST, "--", sys.executable, str(worker), f"--out={out}", "--world=4",
    )  # fmt: skip
    procs = [subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("a0-w4-r*.json"))]
    assert sorted(r["rank"] for r in records) == [0, 1, 2, 3]
    assert all(r["ok"] for r in records), records
    assert sorted(r["group_rank"] for r in records) == [0, 0, 1, 1]
    assert {r["group_world"] for r in records} == {2} and {r["run_id"] for r in records} == {"gloo"}
    assert len({r["master"] for r in records}) == 1


NPROC_WORKER = """\
import json, os, sys, time
log, stop = sys.argv[1], sys.argv[2]
with open(log, "a") as f:
    f.write(json.dumps({k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT")}
                       | {"pid": os.getpid()}) + "\\n")
if os.environ["LOCAL_RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    time.sleep(0.5)
    sys.exit(5)
while not os.path.exists(stop):
    time.sleep(0.05)
"""


def test_one_failed_local_process_stops_the_others_and_restarts_the_node(tmp_path: Path) -> None:
    (tmp_path / "rdzv").mkdir()
    script, log, stop = tmp_path / "w.py", tmp_path / "log.jsonl", tmp_path / "stop"
    script.write_text(NPROC_WORKER)
    argv = fsrdzv(
        "run", "--endpoint", str(tmp_path / "rdzv"), "--run-id", "fail", "--nnodes", "1", "--nproc-per-node", "3",
        "--max-restarts", "1", *FAST, "--", sys.executable, str(script), str(log), str(stop),
    )  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        wait_until("the restart", lambda: log.exists() and len(log.read_text().splitlines()) >= 6, timeout=60)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        first = [r for r in records if r["TORCHELASTIC_RESTART_COUNT"] == "0"]
        assert sorted(r["LOCAL_RANK"] for r in first) == ["0", "1", "2"]
        # The copies that did not fail were stopped before the node re-joined.
        assert not any(pid_alive(r["pid"]) for r in first)
        stop.write_text("")
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "a local process exited with 5" in err and "failed with 5: restart 1 of 1" in err


def test_expect_names_the_nodes_that_never_joined(tmp_path: Path) -> None:
    """``--expect NODES`` (issue 15 §3): the join-timeout message names each expected node that never joined."""
    argv = fsrdzv("run", "--endpoint", str(tmp_path), "--run-id", "exp", "--nnodes", "2", "--join-timeout", "2")
    result = subprocess.run(
        [*argv, "--expect", "node[01-02],gpu7", "--", "true"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    last = result.stderr.splitlines()[-1]
    assert "missing 3 of 3 expected: node01 (never seen), node02 (never seen), gpu7 (never seen)" in last, last
    bad = subprocess.run([*argv, "--expect", "node[01", "--", "true"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unbalanced brackets" in bad.stderr.splitlines()[-1], bad.stderr
