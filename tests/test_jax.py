"""The JAX cluster plug-in with a real CPU JAX: two processes bootstrap ``jax.distributed`` through fsrdzv."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import fsrdzv.jax as fsrdzv_jax  # jax is part of the dev extra: a missing one fails here, loudly
from fsrdzv import ConfigurationError

WORKER = str(pathlib.Path(__file__).with_name("jax_worker.py"))
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("FSRDZV_", "SLURM_", "JAX_"))}


def _results(procs: list[subprocess.Popen[str]]) -> list[dict[str, int]]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(out, key=lambda r: r["index"])


def test_two_processes_bootstrap_through_the_plugin(tmp_path: pathlib.Path) -> None:
    env = {**CLEAN, "FSRDZV_ENDPOINT": str(tmp_path), "FSRDZV_RUN_ID": "jax-plugin", "FSRDZV_NNODES": "2"}
    procs = [
        subprocess.Popen([sys.executable, WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    assert _results(procs) == [{"index": 0, "count": 2, "sum": 3}, {"index": 1, "count": 2, "sum": 3}]


def test_under_fsrdzv_run_the_plugin_takes_the_launchers_round(tmp_path: pathlib.Path) -> None:
    cmd = [sys.executable, "-m", "fsrdzv", "run", "--endpoint", str(tmp_path), "--run-id", "jax-run"]
    cmd += ["--nnodes", "2", "--quiet", "--", sys.executable, WORKER]
    procs = [
        subprocess.Popen(cmd, env=CLEAN, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    assert _results(procs) == [{"index": 0, "count": 2, "sum": 3}, {"index": 1, "count": 2, "sum": 3}]
    # The launcher's round was used: no node of the program joined a second time.
    requests = list((tmp_path / "jax-run" / "records" / "req").iterdir())
    assert len(requests) <= 2


def test_the_plugin_is_opt_in_only(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Registered, but never picked by JAX's auto-detection, even when the fsrdzv variables are set."""
    from jax._src.clusters import ClusterEnv

    monkeypatch.setenv("FSRDZV_ENDPOINT", str(tmp_path))
    monkeypatch.setenv("FSRDZV_RUN_ID", "opt-in")
    monkeypatch.setenv("FSRDZV_NNODES", "2")
    assert fsrdzv_jax.FsrdzvCluster in ClusterEnv._cluster_types
    assert fsrdzv_jax.FsrdzvCluster.is_env_present()
    detected = next((e for e in ClusterEnv._cluster_types if not e.opt_in_only_method and e.is_env_present()), None)
    assert detected is not fsrdzv_jax.FsrdzvCluster


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "FSRDZV_ENDPOINT is not set"),
        ({"FSRDZV_ENDPOINT": "/x"}, "FSRDZV_RUN_ID is not set"),
        ({"FSRDZV_ENDPOINT": "/x", "FSRDZV_RUN_ID": "r"}, "FSRDZV_NNODES is not set"),
        ({"FSRDZV_ENDPOINT": "/x", "FSRDZV_RUN_ID": "r", "FSRDZV_NNODES": "two"}, "is not MIN or MIN:MAX"),
        ({"FSRDZV_ENDPOINT": "/x", "FSRDZV_RUN_ID": "r", "FSRDZV_NNODES": "3:2"}, "1 <= MIN <= MAX"),
        (
            {"FSRDZV_ENDPOINT": "/x", "FSRDZV_RUN_ID": "r", "FSRDZV_NNODES": "2", "FSRDZV_STORAGE_OPTIONS": "[1]"},
            "must be a JSON object",
        ),
    ],
    ids=["no-endpoint", "no-run-id", "no-nnodes", "bad-nnodes", "min-over-max", "options-not-object"],
)
def test_missing_or_bad_environment_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for key in list(os.environ):
        if key.startswith(("FSRDZV_", "SLURM_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert not fsrdzv_jax.FsrdzvCluster.is_env_present()
    with pytest.raises(ConfigurationError, match=message):
        fsrdzv_jax.FsrdzvCluster.get_process_count()


def test_one_port_reservation_for_jax_and_torchrun_without_torch() -> None:
    """``fsrdzv._ports`` serves both faces and imports no torch; JAX's reservation is bound, not listening, so that
    its gRPC server can bind the held port itself (SO_REUSEPORT), while nobody else can."""
    code = (
        "import sys, socket\n"
        "from fsrdzv._ports import PortReservation\n"
        "held = PortReservation(listen=False)\n"
        "port = held.reserve('127.0.0.1')\n"
        "server = socket.socket()\n"
        "server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        "server.bind(('127.0.0.1', port))\n"
        "server.listen()\n"
        "other = socket.socket()\n"
        "try:\n"
        "    other.bind(('127.0.0.1', port))\n"
        "    print('taken')\n"
        "except OSError:\n"
        "    print('held', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=CLEAN)
    assert out.stdout.split() == ["held", "False"], out
    from fsrdzv import torchrun
    from fsrdzv._ports import PortReservation

    assert torchrun.PortReservation is PortReservation
