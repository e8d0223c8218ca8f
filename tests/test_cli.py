"""The ``fsrdzv`` command line through the real console script, against live runs on a directory and on S3 (moto).

Live runs are made of real ``fsrdzv run`` launchers (see ``tests/test_launcher.py``), so ``status`` and ``list``
read what real nodes wrote. Every error path must print exactly one line on stderr and exit with its documented
status.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fsrdzv import open_store
from fsrdzv._admin import RunAdmin
from fsrdzv._settings import Settings
from fsrdzv._state import (
    JoinRequest,
    NodeInfo,
    RendezvousState,
    encode_request,
    encode_state,
    request_owner,
    request_record_name,
)
from fsrdzv._status import read_state
from fsrdzv.testing import corrupt
from tests.nodes import Node
from tests.servers import Endpoint
from tests.test_launcher import Job, fsrdzv, wait_until

CLEAR = "\x1b[H\x1b[2J"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FSRDZV_", "SLURM_"))}
    return subprocess.run(fsrdzv(*args), capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})})


def cli_many(
    cases: list[tuple[list[str], dict[str, str]]], timeout: float = 120
) -> list[subprocess.CompletedProcess[str]]:
    """Run several invocations at once (each is a fresh interpreter: in parallel they cost a lot less wall time)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FSRDZV_", "SLURM_"))}
    procs = [
        (
            argv,
            subprocess.Popen(
                fsrdzv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**base, **env}
            ),
        )
        for argv, env in cases
    ]
    results = []
    for argv, proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(fsrdzv(*argv), proc.returncode, out, err))
    return results


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(r"^fsrdzv( \w+)?: error: \S", lines[0]), lines[0]
    return lines[0]


def s3_option_args(endpoint: Endpoint) -> list[str]:
    """The endpoint's storage options as ``-o KEY=VALUE`` items (nested keys dotted)."""
    out = []
    for key, value in endpoint.storage_options.items():
        if isinstance(value, dict):
            out += [f"-o{key}.{k}={v}" for k, v in value.items()]
        else:
            out.append(f"-o{key}={value}")
    return out


def formed(job: Job, count: int, options: dict[str, Any] | None = None) -> bool:
    state = job.state(options)
    return state is not None and state.complete and len(state.participants) == count


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Job]:
    """Two launchers in a complete round on a directory, their workers waiting for the stop file."""
    endpoint = tmp_path / "rdzv"
    endpoint.mkdir()
    job = Job(tmp_path, str(endpoint))
    for _ in range(2):
        job.start("2")
    try:
        wait_until("two workers", lambda: all(job.starts(i) for i in range(2)))
        yield job
    finally:
        job.cleanup()


def check_status_json(doc: dict[str, Any], endpoint: str) -> None:
    assert doc["schema"] == "fsrdzv.status/1"
    assert doc["endpoint"] == endpoint and doc["run_id"] == "job" and doc["exists"] is True
    assert doc["complete"] is True and doc["closed"] is False
    assert isinstance(doc["round"], int) and isinstance(doc["generation"], int) and doc["generation"] > 0
    assert doc["master"]["addr"] == "127.0.0.1" and doc["master"]["port"] > 0
    assert [p["rank"] for p in doc["participants"]] == [0, 1]
    for p in doc["participants"]:
        assert p["addr"] == "127.0.0.1" and isinstance(p["pid"], int) and p["node_id"]
        hb = p["heartbeat"]
        # keep-alive 0.5 s and a 1.2 s look: every live heartbeat changed while we watched.
        assert hb["present"] is True and hb["changed"] is True and hb["age_is_lower_bound"] is False, hb
        assert 0 <= hb["age_seconds"] < 1.2
    assert doc["waiting"] == [] and doc["spares"] == []
    assert doc["observed_seconds"] >= 1.0


def check_list_json(doc: dict[str, Any], endpoint: str) -> None:
    assert doc["schema"] == "fsrdzv.list/1" and doc["endpoint"] == endpoint
    [run] = doc["runs"]
    assert run["run_id"] == "job" and run["state"] == "running" and run["error"] is None
    assert run["participants"] == 2 and run["waiting"] == 0 and run["spares"] == 0
    assert run["heartbeat_records"] == 2 and run["complete"] is True and run["closed"] is False
    assert run["idle_seconds"] is not None and 0 <= run["idle_seconds"] < 60


# -- help ----------------------------------------------------------------------------------------------------------


def test_help_lists_commands_and_exit_codes() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for word in ("status", "list", "close", "gc", "reset", "doctor", "run", "demo", "exit status", "130"):
        assert word in result.stdout
    commands = ("status", "list", "close", "gc", "reset", "doctor", "run", "demo")
    for command, sub in zip(commands, cli_many([([c, "--help"], {}) for c in commands]), strict=True):
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: fsrdzv {command}"), sub.stderr
        assert "exit status:" in sub.stdout


def test_installed_console_script() -> None:
    script = shutil.which("fsrdzv") or str(Path(sys.executable).parent / "fsrdzv")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("fsrdzv ")
    assert cli().returncode == 2  # no command: the help, and a usage status


# -- status and list against live runs -----------------------------------------------------------------------------


def test_status_and_list_of_a_live_run_on_a_directory(live: Job) -> None:
    wait_until("the round", lambda: formed(live, 2))
    status = cli("status", live.endpoint, "--run-id", "job", "--json", "--observe", "1.2")
    assert status.returncode == 0, status.stderr
    check_status_json(json.loads(status.stdout), live.endpoint)

    listing = cli("list", live.endpoint, "--json")
    assert listing.returncode == 0, listing.stderr
    check_list_json(json.loads(listing.stdout), live.endpoint)

    table = cli("status", "--observe", "0.6", env={"FSRDZV_ENDPOINT": live.endpoint, "SLURM_JOB_ID": "job"})
    assert table.returncode == 0, table.stderr
    assert "participants (2)" in table.stdout and "RANK" in table.stdout and "complete" in table.stdout
    assert re.search(r"^\s+0\s+127\.0\.0\.1\s", table.stdout, re.M)
    assert "job" in cli("list", live.endpoint).stdout


def test_status_and_list_of_a_live_run_on_s3(tmp_path: Path, s3_endpoint: Endpoint) -> None:
    job = Job(tmp_path, s3_endpoint.url, options=s3_option_args(s3_endpoint))
    try:
        for _ in range(2):
            job.start("2")
        wait_until("two workers on S3", lambda: all(job.starts(i) for i in range(2)), timeout=90)
        wait_until("the round", lambda: formed(job, 2, s3_endpoint.storage_options))
        env = {"FSRDZV_STORAGE_OPTIONS": json.dumps(s3_endpoint.storage_options)}
        status = cli("status", s3_endpoint.url, "--run-id", "job", "--json", "--observe", "1.2", env=env)
        assert status.returncode == 0, status.stderr
        check_status_json(json.loads(status.stdout), s3_endpoint.url)
        listing = cli("list", s3_endpoint.url, "--json", *s3_option_args(s3_endpoint))
        assert listing.returncode == 0, listing.stderr
        check_list_json(json.loads(listing.stdout), s3_endpoint.url)
        job.finish()
        assert [job.wait(i) for i in range(2)] == [0, 0]
        closed = cli("status", s3_endpoint.url, "--run-id", "job", "--json", "--observe", "0", env=env)
        assert json.loads(closed.stdout)["closed"] is True
    finally:
        job.cleanup()


def test_watch_refreshes_in_place_until_ctrl_c(live: Job) -> None:
    proc = subprocess.Popen(
        fsrdzv("status", live.endpoint, "--run-id", "job", "--watch", "--interval", "0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.count(CLEAR) >= 2 and "participants (2)" in out and err == ""


# -- close, gc, reset ----------------------------------------------------------------------------------------------


def test_close_stops_a_waiting_node(tmp_path: Path) -> None:
    job = Job(tmp_path, str(tmp_path))
    try:
        node = job.start("2")  # waits for a second node that never comes
        wait_until("the join", lambda: (s := job.state()) is not None and bool(s.participants))
        result = cli("close", job.endpoint, "--run-id", "job")
        assert result.returncode == 0 and "closed run 'job'" in result.stdout, result.stderr
        assert job.wait(node, timeout=30) == 1
        # The launcher logs its progress; the failure itself is one line, the last.
        errors = [line for line in job.stderr(node).splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("fsrdzv run: error: ") and "is closed" in errors[0]
        assert job.stderr(node).splitlines()[-1] == errors[0]
        again = cli("close", job.endpoint, "--run-id", "job")
        assert again.returncode == 0 and "already closed" in again.stdout
    finally:
        job.cleanup()


def _dead_run(endpoint: str, run_id: str, config: dict[str, Any] | None = None) -> None:
    """A complete round whose only node crashed long ago: a document and a heartbeat that never changes."""
    ghost = NodeInfo("10.0.0.9", 4242, 0, "dead00", 29500, "gone")
    state = RendezvousState(
        run_id=run_id,
        epoch="e0",
        generation=4,
        round=2,
        complete=True,
        participants={ghost.node_id: 0},
        nodes={ghost.node_id: ghost},
        master=("10.0.0.9", 29500),
        applied={ghost.node_id: "n0"},
        config=config,
    )
    store = open_store(endpoint, run_id)
    assert store.compare_and_set(encode_state(state), None).won
    store.put_record("hb", ghost.node_id, b'{"n":7}')


def test_gc_removes_finished_and_dead_runs_and_never_a_live_one(tmp_path: Path) -> None:
    endpoint = tmp_path / "rdzv"
    endpoint.mkdir()
    (tmp_path / "l").mkdir()
    (tmp_path / "d").mkdir()
    live_job = Job(tmp_path / "l", str(endpoint), run_id="live")
    done_job = Job(tmp_path / "d", str(endpoint), run_id="done")
    try:
        live_node = live_job.start("1")
        done_job.start("1", "exit0")
        assert done_job.wait(0) == 0
        _dead_run(str(endpoint), "dead")
        corrupt(open_store(str(endpoint), "bad"), b"not a document")
        wait_until("the live worker", lambda: bool(live_job.starts(live_node)))

        kept_young = cli("gc", str(endpoint), "--window", "0.5")  # default --older-than 24h: all too young
        assert kept_young.returncode == 0 and "removed 0 run(s), kept 4" in kept_young.stdout, kept_young.stdout

        dry = cli("gc", str(endpoint), "--older-than", "0", "--window", "1.5", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would remove done: closed" in dry.stdout and "would remove dead: no heartbeat changed" in dry.stdout
        assert re.search(r"kept live: live: \d+ heartbeat record\(s\) changed", dry.stdout), dry.stdout
        assert "kept bad: unreadable document" in dry.stdout
        runs = {r["run_id"] for r in json.loads(cli("list", str(endpoint), "--json").stdout)["runs"]}
        assert runs == {"bad", "dead", "done", "live"}

        real = cli("gc", str(endpoint), "--older-than", "0", "--window", "1.5")
        assert real.returncode == 0 and "removed 2 run(s), kept 2" in real.stdout, real.stdout
        runs = {r["run_id"] for r in json.loads(cli("list", str(endpoint), "--json").stdout)["runs"]}
        assert runs == {"bad", "live"}
        live_job.finish()
        assert live_job.wait(live_node) == 0, "the live run was not disturbed"
    finally:
        live_job.cleanup()
        done_job.cleanup()


def _crash_leftovers(url: str, options: dict[str, Any], tmp: Path) -> tuple[list[Node], dict[str, list[str]]]:
    """A live run with crash leftovers: two live nodes (rdzv_node.py) in a complete round, three spares SIGKILLed
    and removed from the document without their records (as an older fsrdzv, or a removal whose deletes failed),
    past a one-entry history of departed nodes: two of them have requests the document no longer remembers folding.
    The one whose folded request it still remembers also lost its heartbeat record (a partial clean-up). A joining
    node's request (no heartbeat yet, never folded) sits beside them."""
    stop = str(tmp / "stop")
    live = [Node(url, "job", 2, 2, hold=300, stop_file=stop, options=options) for _ in range(2)]
    for node in live:
        node.wait_for("rank", 90)
    crashed = [Node(url, "job", 2, 2, options=options) for _ in range(3)]
    ids = [n.wait_for("start")["node"] for n in crashed]
    store = open_store(url, "job", storage_options=options)
    wait_until("three spares heartbeating", lambda: _spares(store, ids), timeout=90)
    for node in crashed:
        node.kill()
    settings = Settings(run_id="job", min_nodes=2, max_nodes=2, applied_history=1)
    after = RunAdmin(store, settings).remove_nodes(ids)
    assert after is not None and not set(ids) & after.members(), after
    [remembered] = [n for n in ids if n in after.applied]
    store.delete_record("hb", remembered)
    joining = JoinRequest(NodeInfo("10.9.9.9", 77, 0, "j0", 29400, "joiner"), "1.abc", None)
    store.put_record("req", request_record_name(joining, store.name_mac), encode_request(joining))
    kinds = {"dead": [n for n in ids if n != remembered], "removed": [remembered], "joining": [joining.node.node_id]}
    kinds["live"] = [n.events[0]["node"] for n in live]
    return live, kinds


def _spares(store: Any, ids: list[str]) -> bool:
    state = read_state(store)
    return state is not None and set(state.redundancy_list) == set(ids) and set(ids) <= set(store.list_records("hb"))


def _owners(store: Any) -> tuple[set[str], set[str]]:
    return set(store.list_records("hb")), {request_owner(n) for n in store.list_records("req")}


@pytest.mark.parametrize("where", ["directory", "s3"])
def test_gc_deletes_what_crashed_nodes_left_in_a_live_run(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Issue 15 §5: in a live run, gc deletes the records of SIGKILLed nodes that are no longer members (dead
    heartbeat: all their records; no heartbeat: a request the document folded) and never a live node's records or
    a joining node's request."""
    if where == "s3":
        s3: Endpoint = request.getfixturevalue("s3_endpoint")
        url, options, flags = s3.url, s3.storage_options, s3_option_args(s3)
    else:
        (tmp_path / "rdzv").mkdir()
        url, options, flags = str(tmp_path / "rdzv"), {}, []
    live, kinds = _crash_leftovers(url, options, tmp_path)
    store = open_store(url, "job", storage_options=options)
    try:
        beats, asks = _owners(store)
        assert set(kinds["dead"]) | set(kinds["live"]) <= beats and set(kinds["removed"]).isdisjoint(beats)
        assert set(kinds["dead"]) | set(kinds["removed"]) | set(kinds["joining"]) <= asks

        dry = cli("gc", url, *flags, "--window", "1.5", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        doc = json.loads(dry.stdout)
        assert doc["schema"] == "fsrdzv.gc/1" and doc["dry_run"] is True and doc["endpoint"] == url
        [run] = doc["runs"]
        assert run["run_id"] == "job" and run["verdict"] == "keep" and run["observed_seconds"] >= 1.5, run
        gone = {g["node_id"]: g for g in run["gone_nodes"]}
        assert set(gone) == set(kinds["dead"]) | set(kinds["removed"]), run
        for node_id in kinds["dead"]:
            assert gone[node_id] == {"node_id": node_id, "why": "dead", "heartbeat_record": True, "join_requests": 1}
        [removed] = kinds["removed"]
        assert gone[removed] == {"node_id": removed, "why": "removed", "heartbeat_record": False, "join_requests": 1}
        assert doc["removed_records"] == 5 and doc["removed_runs"] == 0 and doc["kept_runs"] == 1
        assert _owners(store) == (beats, asks), "a dry run deletes nothing"

        real = cli("gc", url, *flags, "--window", "1.5", "--run-id", "job")
        assert real.returncode == 0, real.stderr
        assert "removed 5 record(s) of 3 gone node(s) in run job" in real.stdout, real.stdout
        summary = "gc: removed 0 run(s), kept 1; removed 5 record(s) of 3 gone node(s) in kept runs\n"
        assert real.stdout.endswith(summary), real.stdout
        beats_after, asks_after = _owners(store)
        assert beats_after == set(kinds["live"]), beats_after
        gone_ids = set(kinds["dead"]) | set(kinds["removed"])
        assert asks_after.isdisjoint(gone_ids) and set(kinds["joining"]) <= asks_after, asks_after
        state = read_state(store)
        assert state is not None and state.complete and set(state.participants) == set(kinds["live"])
        again = json.loads(cli("gc", url, *flags, "--window", "1.5", "--json").stdout)
        assert again["runs"][0]["gone_nodes"] == [] and again["removed_records"] == 0, again
        (tmp_path / "stop").write_text("")
        assert [n.wait(60) for n in live] == [0, 0], "the live nodes were not disturbed"
    finally:
        (tmp_path / "stop").write_text("")
        for node in live:
            node.kill()


def test_gc_watches_a_run_for_its_own_liveness_timeout(tmp_path: Path) -> None:
    """A run whose document records a liveness timeout longer than --window is watched for that long: gc never
    calls a node dead sooner than the run itself would."""
    _dead_run(str(tmp_path), "slow", {"keep_alive_ms": 1000, "keep_alive_max_attempt": 2})
    _dead_run(str(tmp_path), "old")  # no config (an older fsrdzv): --window
    doc = json.loads(cli("gc", str(tmp_path), "--older-than", "0", "--window", "0.5", "--json").stdout)
    runs = {r["run_id"]: r for r in doc["runs"]}
    assert runs["slow"]["observed_seconds"] >= 2.0 and 0.5 <= runs["old"]["observed_seconds"] < 2.0, runs
    assert {r["verdict"] for r in runs.values()} == {"remove"} and doc["removed_runs"] == 2


def test_gc_of_one_run_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    _dead_run(str(tmp_path), "there")
    line = one_line_error(cli("gc", str(tmp_path), "--run-id", "nope", "--window", "0.1"), 5)
    assert "no run 'nope'" in line and "runs there: there" in line
    assert "invalid run id" in one_line_error(cli("gc", str(tmp_path), "--run-id", "a b"), 2)
    assert "--window" in one_line_error(cli("gc", str(tmp_path), "--window", "0"), 2)


def test_reset_is_the_way_out_of_a_corrupt_document(tmp_path: Path) -> None:
    endpoint = str(tmp_path)
    corrupt(open_store(endpoint, "bad"), b"\x00garbage")
    line = one_line_error(cli("status", endpoint, "--run-id", "bad"), 4)
    assert "reset --force" in line
    debug = cli("status", endpoint, "--run-id", "bad", "--debug")
    assert debug.returncode == 4 and "Traceback" in debug.stderr
    assert "--force" in one_line_error(cli("reset", endpoint, "--run-id", "bad"), 2)
    reset = cli("reset", endpoint, "--run-id", "bad", "--force")
    assert reset.returncode == 0 and "unreadable document" in reset.stdout, reset.stderr
    after = cli("status", endpoint, "--run-id", "bad", "--json", "--observe", "0")
    assert after.returncode == 0
    doc = json.loads(after.stdout)
    assert doc["exists"] and doc["round"] == 0 and not doc["closed"] and doc["participants"] == []
    one_line_error(cli("reset", endpoint, "--run-id", "nope", "--force"), 5)


# -- every error path: one line, a documented status ----------------------------------------------------------------


def test_error_paths_print_one_line(tmp_path: Path) -> None:
    endpoint = str(tmp_path)
    _dead_run(endpoint, "exists")
    cases: list[tuple[list[str], int, str, dict[str, str]]] = [
        (["status", "foo://bucket/x", "--run-id", "a"], 2, "scheme 'foo' is not supported", {}),
        (["status", endpoint, "--run-id", "missing"], 5, "no run 'missing'", {}),
        (["status", str(tmp_path / "nope" / "deeper"), "--run-id", "a"], 3, "does not exist", {}),
        (["list", str(tmp_path / "nope")], 3, "does not exist", {}),
        (["status", endpoint, "--run-id", "exists", "--observe", "soon"], 2, "invalid duration 'soon'", {}),
        (["status", endpoint, "--run-id", "exists", "-o", "novalue"], 2, "KEY=VALUE", {}),
        (["status", endpoint, "--run-id", "exists", "-o", "bogus=1"], 2, "unknown storage option", {}),
        (["status", endpoint, "--run-id", "exists"], 2, "FSRDZV_STORAGE_OPTIONS", {"FSRDZV_STORAGE_OPTIONS": "[1]"}),
        (["status", endpoint, "--run-id", "exists", "--secret-file", str(tmp_path / "no")], 2, "secret file", {}),
        (["status", endpoint, "--run-id", "a b"], 2, "invalid run id", {}),
        (["status", endpoint], 2, "no run id", {}),
        (["status"], 2, "no endpoint", {}),
        (["close", endpoint, "--run-id", "missing"], 5, "runs there: exists", {}),
        (["close", endpoint], 2, "--run-id", {}),
        (["reset", endpoint, "--run-id", "exists"], 2, "--force", {}),
        (["gc", endpoint, "--older-than", "-3"], 2, "--older-than", {}),
        (["frobnicate"], 2, "invalid choice", {}),
        (["demo", "--nodes", "1"], 2, "minimum 2", {}),
    ]
    results = cli_many([(argv, env) for argv, _, _, env in cases])
    for (argv, code, words, _), result in zip(cases, results, strict=True):
        line = one_line_error(result, code)
        assert words in line, (argv, line)


def test_unreachable_s3_is_one_line() -> None:
    opts = [
        "-o", "endpoint_url=http://127.0.0.1:9", "-o", "key=k", "-o", "secret=s",
        "-o", 'config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2}',
    ]  # fmt: skip
    for argv in (["status", "s3://bucket/rdzv", "--run-id", "a", *opts], ["list", "s3://bucket/rdzv", *opts]):
        line = one_line_error(cli(*argv), 3)
        assert "127.0.0.1:9" in line and "Errno" not in line


# -- demo ----------------------------------------------------------------------------------------------------------


def test_demo_shows_formation_failure_and_scale_up() -> None:
    start = time.monotonic()
    result = cli("demo", "--nodes", "3", timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for word in ("round 0 complete: 3 nodes", "kill -9 node2", "re-forming", "complete: 2 nodes", "started node4"):
        assert word in out, out
    assert "summary" in out and "exit statuses: node1=0 node3=0 node4=0" in out
    assert elapsed < 60
    tmp = re.search(r"endpoint (\S+)/rdzv", out)
    assert tmp is not None and not os.path.exists(tmp.group(1)), "the demo cleans up"


# -- the status model: heartbeat ages from the handler's liveness tracker ------------------------------------------


def test_status_ages_come_from_the_liveness_tracker() -> None:
    from fsrdzv._liveness import LivenessTracker
    from fsrdzv._status import heartbeat_json, observe_heartbeats

    observer = LivenessTracker.observer()
    observe_heartbeats(observer, {"a": "1", "gone": "1"}, 10.0)
    observe_heartbeats(observer, {"a": "1", "new": "1"}, 12.0)
    # Unchanged since the first look: a lower bound. Appeared while watched: a real change. Gone: forgotten.
    assert heartbeat_json(observer, "a", 13.0) == {
        "present": True,
        "changed": False,
        "age_seconds": 3.0,
        "age_is_lower_bound": True,
    }
    assert heartbeat_json(observer, "new", 13.0)["age_is_lower_bound"] is False
    assert heartbeat_json(observer, "gone", 13.0)["present"] is False
    observe_heartbeats(observer, {"a": "2", "new": "1"}, 20.0)
    assert heartbeat_json(observer, "a", 20.5) == {
        "present": True,
        "changed": True,
        "age_seconds": 0.5,
        "age_is_lower_bound": False,
    }
    assert observer.changed_since(15.0) == {"a"} and observer.dead({"a", "new"}, 1e9) == set()


# -- issue 15 §4: what retrying cannot fix fails at once, in a line that says what it is -------------------------


def test_reset_over_an_unreadable_document_continues_above_every_generation(tmp_path: Path) -> None:
    from fsrdzv._admin import RunAdmin

    store = open_store(str(tmp_path), "gens")
    snap = None
    for n in range(5):  # five generations in the directory's log
        result = store.compare_and_set(encode_state(RendezvousState("gens", "e", generation=n)), snap and snap.token)
        snap = result.snapshot
    assert snap is not None and snap.generation == 5
    corrupt(store, b"\x00garbage")  # the envelope itself is gone: only the log remembers generation 5
    assert store.highest_generation() >= 5
    reset = RunAdmin(store).reset()
    assert reset.unreadable is not None
    assert reset.state.generation > 5
    after = store.read()
    assert after is not None and after.generation > 5, after


def test_small_messages_of_issue_15(tmp_path: Path) -> None:
    plain = tmp_path / "plain-file"
    plain.write_text("x")
    _dead_run(str(tmp_path), "exists")
    results = cli_many(
        [
            (["status", str(plain), "--run-id", "r"], {}),
            (["status", "--bogus"], {}),
            (["status", str(tmp_path), "--run-id", "nope", "--watch", "--interval", "0.2"], {}),
        ]
    )
    line = one_line_error(results[0], 3)
    assert "is a file, not a directory" in line and "does not exist" not in line, line
    line = one_line_error(results[1], 2)
    assert line.startswith("fsrdzv status: error:") and "'fsrdzv status --help'" in line, line
    # --watch on a missing run exits as the one-shot form does, instead of waiting forever.
    assert "no run 'nope'" in one_line_error(results[2], 5)


def test_run_help_says_what_heartbeat_timeout_bounds() -> None:
    out = cli("run", "--help").stdout
    text = " ".join(out.split())
    assert "read deadline" in text and "one heartbeat write" not in text


def test_a_missing_sdk_names_the_package_not_the_namespace(tmp_path: Path) -> None:
    # Run without the Google SDK: a meta-path hook refuses 'google' as an uninstalled namespace would.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'google' or name.startswith('google.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fsrdzv\n"
        "try:\n"
        "    fsrdzv.open_store('gs://bucket/prefix', 'r')\n"
        "except fsrdzv.ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "google-cloud-storage is missing" in out.stdout and "pip install '.[gcs]'" in out.stdout, out


def test_status_names_the_expected_nodes_not_in_the_run(tmp_path: Path) -> None:
    """Issue 15 §3: ``fsrdzv status`` names the expected nodes (the document's ``config.expected_nodes``) that
    no member runs on, and whether a heartbeat record of that host was seen."""
    from fsrdzv import create_handler

    with create_handler(str(tmp_path), "exp", 1, 1, last_call_timeout=0.1, expected_nodes=["node[01-02]"]) as h:
        h.next_rendezvous()
        run = subprocess.run(
            fsrdzv("status", str(tmp_path), "--run-id", "exp", "--json", "--observe", "0.2"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        doc = json.loads(run.stdout)
        assert doc["expected"]["nodes"] == ["node01", "node02"], doc["expected"]
        assert [m["name"] for m in doc["expected"]["missing"]] == ["node01", "node02"], doc["expected"]
        assert all(m["heartbeat"] is None for m in doc["expected"]["missing"])
        text = subprocess.run(
            fsrdzv("status", str(tmp_path), "--run-id", "exp", "--observe", "0.2"), capture_output=True, text=True
        ).stdout
        assert "expected, not in the run (2 of 2): node01 (never seen), node02 (never seen)" in text, text
