"""Scale-up only at safe points (issue 14 §1), with real ``fsrdzv run`` processes on a directory.

Each node runs a worker that logs its starts (tests/test_launcher.py's Job) and, while the file ``go`` exists, calls
``fsrdzv.safe_point()`` every 50 ms. So the test decides when the workers reach a safe point:

* a newcomer is held back (the others keep their round, ``fsrdzv status`` shows it deferred) until the safe
  point, then admitted;
* ``--scale-up-max-delay`` admits it without any safe point;
* a dead participant is never deferred: the survivors re-form at once, newcomer included;
* bad values get one clear line (``fsrdzv run`` and ``--rdzv-conf``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import fsrdzv
from fsrdzv._scaleup import ScaleUpPolicy
from tests.test_launcher import FAST, Job, wait_until
from tests.test_launcher import fsrdzv as fsrdzv_cli

pytestmark = pytest.mark.timeout(240)

#: Appended to tests/test_launcher.py's worker: safe points while ``go`` exists (next to the stop file).
SAFE_POINTS = """
import fsrdzv
go = os.path.join(os.path.dirname(stop), "go")
marked = 0
while not os.path.exists(stop):
    if os.path.exists(go) and fsrdzv.safe_point():
        marked += 1
        write("safe_point", count=marked)
    time.sleep(0.05)
write("finish")
"""


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    endpoint = tmp_path / "rdzv"
    endpoint.mkdir()
    j = Job(tmp_path, str(endpoint))
    # The launcher test's worker waits for the stop file at its end; ours marks safe points meanwhile.
    text = j.worker.read_text()
    head = text[: text.index("while not os.path.exists(stop):")]
    j.worker.write_text(head + SAFE_POINTS)
    try:
        yield j
    finally:
        j.cleanup()


def _status(job: Job) -> dict[str, object]:
    out = subprocess.run(
        fsrdzv_cli("status", job.endpoint, "--run-id", job.run_id, "--json", "--observe", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def _world(job: Job, index: int) -> str | None:
    starts = job.starts(index)
    return starts[-1]["WORLD_SIZE"] if starts else None


def _two_running(job: Job, *extra: str) -> list[int]:
    nodes = [job.start("1:3", "wait", *extra) for _ in range(2)]
    wait_until("a round of two", lambda: all(_world(job, i) == "2" for i in nodes), timeout=60)
    return nodes


SAFE = ("--scale-up-at", "safe_point")


def test_newcomer_waits_for_the_safe_point_then_joins(job: Job) -> None:
    nodes = _two_running(job, *SAFE, "--scale-up-max-delay", "600")
    starts = [len(job.starts(i)) for i in nodes]
    newcomer = job.start("1:3", "wait", *SAFE, "--scale-up-max-delay", "600")
    wait_until("the newcomer to wait", lambda: bool((s := job.state()) and s.wait_list), timeout=60)
    # Held back: for several monitor periods nobody restarts, and status says why.
    time.sleep(3)
    assert [len(job.starts(i)) for i in nodes] == starts, "a newcomer must not restart the workers before a safe point"
    assert job.starts(newcomer) == []
    doc = _status(job)
    scale_up = doc["scale_up"]
    assert isinstance(scale_up, dict), doc
    assert [d["node_id"] for d in scale_up["deferred"]] == list(job.state().wait_list)  # type: ignore[union-attr]
    assert scale_up["max_delay_seconds"] == 600 and scale_up["since"] <= time.time()
    text = subprocess.run(
        fsrdzv_cli("status", job.endpoint, "--run-id", job.run_id, "--observe", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "deferred" in text and "safe point" in text, text
    # The safe point: every participant marks one, and the round re-forms with the newcomer.
    (job.root / "go").write_text("")
    everyone = [*nodes, newcomer]
    wait_until("scale-up to three", lambda: all(_world(job, i) == "3" for i in everyone), timeout=60)
    marks = [r for i in nodes for r in job.records(i) if r["event"] == "safe_point"]
    assert marks, "the workers recorded safe points"
    # Only while a newcomer was held back: one or a few writes per node, not one per call (every 50 ms).
    assert len(marks) <= 2 * 10, marks
    assert _status(job)["scale_up"] is None
    job.finish()
    assert [job.wait(i) for i in everyone] == [0, 0, 0]
    assert "every participant marked a safe point" in job.stderr(nodes[0]) + job.stderr(nodes[1])


def test_max_delay_admits_the_newcomer_without_a_safe_point(job: Job) -> None:
    nodes = _two_running(job, *SAFE, "--scale-up-max-delay", "3")
    newcomer = job.start("1:3", "wait", *SAFE, "--scale-up-max-delay", "3")
    wait_until("the newcomer to wait", lambda: bool((s := job.state()) and s.wait_list), timeout=60)
    waiting_since = time.monotonic()
    everyone = [*nodes, newcomer]
    wait_until("scale-up to three", lambda: all(_world(job, i) == "3" for i in everyone), timeout=60)
    assert time.monotonic() - waiting_since >= 2.0, "admitted before scale_up_max_delay"
    assert not [r for i in everyone for r in job.records(i) if r["event"] == "safe_point"]
    job.finish()
    assert [job.wait(i) for i in everyone] == [0, 0, 0]
    assert "scale_up_max_delay=3s" in job.stderr(nodes[0]) + job.stderr(nodes[1])


def test_a_dead_participant_is_never_deferred(job: Job) -> None:
    nodes = [job.start("2:4", "wait", *SAFE, "--scale-up-max-delay", "600") for _ in range(3)]
    wait_until("a round of three", lambda: all(_world(job, i) == "3" for i in nodes), timeout=60)
    newcomer = job.start("2:4", "wait", *SAFE, "--scale-up-max-delay", "600")
    wait_until("the newcomer to wait", lambda: bool((s := job.state()) and s.wait_list), timeout=60)
    time.sleep(1.5)  # deferred now
    assert all(len(job.starts(i)) == 1 for i in nodes)
    victim, survivors = nodes[1], [nodes[0], nodes[2]]
    job.procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    everyone = [*survivors, newcomer]
    # No safe point, max delay 600 s: only the death can re-form the round (keep-alive 0.5 s x 3 = 1.5 s).
    wait_until("the survivors and the newcomer as three", lambda: all(_world(job, i) == "3" for i in everyone))
    assert time.monotonic() - killed < 30
    assert not [r for i in everyone for r in job.records(i) if r["event"] == "safe_point"]
    job.finish()
    assert [job.wait(i) for i in everyone] == [0, 0, 0]


# -- bad values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [("--scale-up-at", "sometimes", "invalid choice: 'sometimes'"), ("--scale-up-max-delay", "-5", "'-5'")],
)
def test_bad_launcher_values_are_one_line(tmp_path: Path, option: str, value: str, expected: str) -> None:
    argv = fsrdzv_cli(
        "run", "--endpoint", str(tmp_path), "--run-id", "x", "--nnodes", "1", *FAST, f"{option}={value}", "--", "true"
    )
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.stderr


def test_bad_policy_values_name_the_key_and_the_fix() -> None:
    with pytest.raises(fsrdzv.ConfigurationError) as err:
        ScaleUpPolicy.parse("sometimes", 10, source="--rdzv-conf")
    assert str(err.value) == (
        "invalid --rdzv-conf value scale_up_at='sometimes': expected any_time (torch's) or safe_point"
    )
    with pytest.raises(fsrdzv.ConfigurationError, match=r"scale_up_max_delay='-1': expected a number of seconds >= 0"):
        ScaleUpPolicy.parse("safe_point", "-1", source="--rdzv-conf")
    with pytest.raises(fsrdzv.ConfigurationError, match="scale_up_max_delay"):
        fsrdzv.create_handler("memory://x", "r", 1, 1, scale_up_max_delay=float("nan"))
    assert ScaleUpPolicy.parse(" safe_point ", "0") == ScaleUpPolicy("safe_point", 0.0)


def test_safe_point_with_the_flag_but_no_run_names_the_missing_variable(tmp_path: Path) -> None:
    flag = tmp_path / "wanted"
    flag.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSRDZV_") and k != "LOCAL_RANK"}
    env["FSRDZV_SAFE_POINT_FILE"] = str(flag)
    code = "import fsrdzv\ntry:\n    fsrdzv.safe_point()\nexcept fsrdzv.ConfigurationError as e:\n    print(e)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert "FSRDZV_ENDPOINT is not" in result.stdout, result
    env["LOCAL_RANK"] = "1"  # not the node's first process: returns at once, whatever the rest says
    code = "import fsrdzv\nprint(fsrdzv.safe_point())\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.stdout.strip() == "False", result
