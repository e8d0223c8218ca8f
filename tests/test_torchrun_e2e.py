"""End to end: real ``torchrun`` agents with ``--rdzv-backend=fsrdzv``, gloo workers, an all-reduce checked by every
worker (tests/torchrun_worker.py). The scenarios of issue 4:

1. two agents x 2 workers, ``--nnodes=2``, on a directory and on S3 (moto);
2. scale-up with default settings (``--nnodes=1:2``, the second agent arrives while the first trains), with rank 0
   staying on the first node and with rank 0 moving to the newcomer (torch 2.13's c10d fails both, §13.1);
3. a node SIGKILLed mid-run; the survivor re-forms alone after the keep-alive timeout and finishes;
4. the same command twice with the same ``--rdzv-id``;
5. a spare (three agents, ``--nnodes=2``) exits with status 0 when the run ends (torch 2.13 crashes, §13.4);
6. the backend contract is in tests/test_torchrun_backend.py.

Every agent runs in its own process group; the ``cluster`` context kills whatever is left when a test ends.
Settings are small (last call 1 s, keep-alive 1 s x 3) so that the file runs in a few minutes on two cores.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

import fsrdzv
from fsrdzv._state import decode_state
from tests.servers import Endpoint
from tests.torchrun_helpers import FAST_CONF, Cluster, cluster

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.timeout(240)]

#: Generous bounds for a loaded 2-core machine; the scenarios take 10-30 s each.
FINISH = 150.0


def _run_id() -> str:
    return "e2e-" + uuid.uuid4().hex[:8]


def _assert_round(
    records: list[dict[str, Any]], *, world: int, restart: int | None = None, agent_store: str = "True"
) -> None:
    """All ``world`` workers of that world reported a correct sum and agreed on one master and one run."""
    mine = [r for r in records if r["world"] == world and (restart is None or r["restart"] == restart)]
    assert sorted(r["rank"] for r in mine) == list(range(world)), mine
    assert all(r["ok"] for r in mine), mine
    assert len({r["master"] for r in mine}) == 1, f"workers of one round saw different masters: {mine}"
    assert {r["agent_store"] for r in mine} == {agent_store}


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Cluster]:
    with cluster(tmp_path, str(tmp_path / "rdzv")) as c:
        yield c


# -- 1. formation --------------------------------------------------------------------------------------------


def test_two_agents_two_workers_on_a_directory(local: Cluster) -> None:
    run_id = _run_id()
    agents = [local.start(n, nnodes="2", run_id=run_id, worker_args=["--world=4"]) for n in ("A", "B")]
    assert local.wait_all(agents, FINISH) == [0, 0], local.logs()
    _assert_round(local.records(), world=4)
    assert sorted({r["group_rank"] for r in local.records()}) == [0, 1]


def test_two_agents_two_workers_on_s3(tmp_path: Path, s3_endpoint: Endpoint) -> None:
    url, options, env = s3_endpoint  # moto, from conftest.py
    # The agents learn the S3 endpoint from --rdzv-conf (endpoint_url=...), credentials from the environment.
    env = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}
    conf_url = options["endpoint_url"]
    with cluster(tmp_path, url, env) as c:
        run_id = _run_id()
        conf = f"last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,endpoint_url={conf_url}"
        agents = [c.start(n, nnodes="2", run_id=run_id, conf=conf, worker_args=["--world=4"]) for n in ("A", "B")]
        assert c.wait_all(agents, FINISH) == [0, 0], c.logs()
        _assert_round(c.records(), world=4)
        store = fsrdzv.open_store(url, run_id, storage_options=options)
        snapshot = store.read()
        assert snapshot is not None
        assert decode_state(snapshot.data, "test").closed


# -- 2. scale-up ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr_a", "addr_b"),
    [("127.0.0.1", "127.0.0.2"), ("127.0.0.2", "127.0.0.1")],
    ids=["rank0-stays", "rank0-moves"],
)
def test_scale_up_restarts_both_into_a_world_of_two(local: Cluster, addr_a: str, addr_b: str) -> None:
    run_id = _run_id()
    # Workers finish only in the world of 4; in A's world of 2 they keep all-reducing until A restarts them.
    a = local.start("A", nnodes="1:2", run_id=run_id, local_addr=addr_a, worker_args=["--world=4"])
    local.wait_for("A training alone", lambda: local.has(world=2), FINISH)
    b = local.start("B", nnodes="1:2", run_id=run_id, local_addr=addr_b, worker_args=["--world=4"])
    assert local.wait_all([a, b], FINISH) == [0, 0], local.logs()
    records = local.records()
    # A new node is not a failure: the restart budget (max_restarts=0) is untouched.
    _assert_round(records, world=4, restart=0)
    master = next(r["master"] for r in records if r["world"] == 4)
    assert master.startswith(min(addr_a, addr_b) + ":"), f"rank 0 must be the lowest address, got {master}"
    solo = next(r["master"] for r in records if r["world"] == 2)
    assert solo != master, "the new round must have a new TCPStore server"


# -- 3. node failure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["rank1", "rank0"])
def test_survivor_reforms_alone_after_a_node_is_killed(local: Cluster, tmp_path: Path, victim: str) -> None:
    """Killing rank 1 leaves the store host alive; killing rank 0 takes the workers' TCPStore server with it, so
    the survivor must host a new one in the next round (torch's cached bootstrap info cannot, §13.1)."""
    run_id = _run_id()
    release = tmp_path / "release"
    # World 4 holds until a peer dies; the survivor's world of 2 finishes once released.
    args = ["--world=2", f"--hold={release}"]
    # Ranks follow the addresses: A (127.0.0.1) is rank 0, B (127.0.0.2) rank 1.
    a = local.start("A", nnodes="1:2", run_id=run_id, max_restarts=3, local_addr="127.0.0.1", worker_args=args)
    b = local.start("B", nnodes="1:2", run_id=run_id, max_restarts=3, local_addr="127.0.0.2", worker_args=args)
    local.wait_for("both nodes training", lambda: local.has(world=4), FINISH)
    dead, survivor = (b, a) if victim == "rank1" else (a, b)
    dead.kill()
    release.touch()
    assert local.wait_all([survivor], FINISH) == [0], local.logs()
    records = local.records()
    again = [r for r in records if r["world"] == 2 and r["restart"] >= 1]
    assert sorted(r["rank"] for r in again) == [0, 1], records
    assert all(r["ok"] for r in again)
    assert len({r["master"] for r in again}) == 1
    assert again[0]["master"].startswith("127.0.0.1:" if survivor is a else "127.0.0.2:")


# -- 4. run id reuse -----------------------------------------------------------------------------------------


def test_same_run_id_twice_in_a_row(tmp_path: Path) -> None:
    run_id = _run_id()
    endpoint = str(tmp_path / "rdzv")
    for attempt in range(2):
        workdir = tmp_path / f"run{attempt}"
        workdir.mkdir()
        with cluster(workdir, endpoint) as c:
            agents = [c.start(n, nnodes="2", nproc=1, run_id=run_id, worker_args=["--world=2"]) for n in ("A", "B")]
            assert c.wait_all(agents, FINISH) == [0, 0], f"attempt {attempt}\n{c.logs()}"
            _assert_round(c.records(), world=2)


# -- 5. a spare ----------------------------------------------------------------------------------------------


def test_spare_exits_cleanly_when_the_run_ends(local: Cluster, tmp_path: Path) -> None:
    run_id = _run_id()
    release = tmp_path / "release"
    args = ["--world=2", f"--hold={release}"]
    a = local.start("A", nnodes="2", nproc=1, run_id=run_id, worker_args=args)
    b = local.start("B", nnodes="2", nproc=1, run_id=run_id, worker_args=args)
    local.wait_for("the round of two training", lambda: local.has(world=2), FINISH)
    spare = local.start("C", nnodes="2", nproc=1, run_id=run_id, worker_args=args)
    store = fsrdzv.open_store(local.endpoint, run_id)

    def c_is_spare() -> bool:
        snapshot = store.read()
        return snapshot is not None and len(decode_state(snapshot.data, "test").redundancy_list) == 1

    local.wait_for("the third agent waiting as a spare", c_is_spare, FINISH)
    release.touch()
    assert local.wait_all([a, b, spare], FINISH) == [0, 0, 0], local.logs()
    assert "AttributeError" not in spare.output()
    assert not any(r["world"] != 2 for r in local.records())


# -- issue 14: scale-up at safe points, TORCH_DISABLE_SHARE_RDZV_TCP_STORE --------------------------------------


def test_scale_up_waits_for_the_workers_safe_point(local: Cluster, tmp_path: Path) -> None:
    run_id = _run_id()
    go = tmp_path / "go"
    conf = FAST_CONF + ",scale_up_at=safe_point,scale_up_max_delay=120"
    args = ["--world=4", f"--safe-point-file={go}"]
    a = local.start("A", nnodes="1:2", run_id=run_id, conf=conf, worker_args=args)
    local.wait_for("A training alone", lambda: local.has(world=2), FINISH)
    b = local.start("B", nnodes="1:2", run_id=run_id, conf=conf, worker_args=args)
    store = fsrdzv.open_store(local.endpoint, run_id)

    def b_waits() -> bool:
        snap = store.read()
        return snap is not None and bool(decode_state(snap.data, "test").wait_list)

    local.wait_for("B waiting to join", b_waits, FINISH)
    time.sleep(4)  # 40 of the agent's monitor periods: torch's policy would have restarted A long ago
    assert not local.has(world=4, count=1), "a newcomer must not restart the workers before a safe point"
    go.write_text("")
    assert local.wait_all([a, b], FINISH) == [0, 0], local.logs()
    _assert_round(local.records(), world=4, restart=0)
    assert "marked a safe point" in a.output()


def test_sharing_off_scale_up_and_all_reduce(local: Cluster) -> None:
    """Reference E4: with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 worker rank 0 binds a fresh port every round."""
    local.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    run_id = _run_id()
    a = local.start("A", nnodes="1:2", run_id=run_id, worker_args=["--world=4"])
    local.wait_for("A training alone", lambda: local.has(world=2), FINISH)
    b = local.start("B", nnodes="1:2", run_id=run_id, local_addr="127.0.0.2", worker_args=["--world=4"])
    assert local.wait_all([a, b], FINISH) == [0, 0], local.logs()
    records = local.records()
    _assert_round(records, world=4, restart=0, agent_store="False")
    solo = next(r["master"] for r in records if r["world"] == 2)
    assert solo != next(r["master"] for r in records if r["world"] == 4)
