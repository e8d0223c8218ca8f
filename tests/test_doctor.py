"""``fsrdzv doctor`` through the real console script: passes on good storage, fails on lying or lock-less storage.

Mount options cannot be changed on a test machine (and the kernel here has no NFS client), so the ``mount`` check
is fed recorded ``/proc/self/mountinfo`` files from ``tests/fixtures`` through ``run_doctor(mountinfo=...)``, and
a store that lies about CAS through ``run_doctor(wrap_store=...)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fsrdzv._doctor import find_mount, mount_findings, parse_mountinfo, run_doctor
from fsrdzv.testing import FaultyStore
from tests.servers import Endpoint

FIXTURES = Path(__file__).parent / "fixtures"


def doctor(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fsrdzv", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def verdicts(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    doc: dict[str, Any] = json.loads(result.stdout)
    assert doc["schema"] == "fsrdzv.doctor/1"
    return {c["name"]: c["verdict"] for c in doc["checks"]}


def test_passes_on_a_local_directory(tmp_path: Path) -> None:
    result = doctor(str(tmp_path), "--json", "--rounds", "3", "--samples", "5")
    assert result.returncode == 0, result.stderr
    got = verdicts(result)
    assert got["reach"] == got["cas"] == got["lock"] == "pass"
    # The machine's own mount, clock and speed are not under test: anything but a failure.
    assert got["mount"] in {"pass", "warn", "skip"} and got["clock"] in {"pass", "warn"}
    assert got["latency"] in {"pass", "warn"}
    assert os.listdir(tmp_path) == [], "the scratch run must be removed"


def test_text_output_has_one_verdict_per_check(tmp_path: Path) -> None:
    result = doctor(str(tmp_path), "--rounds", "2", "--samples", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("reach", "cas", "lock", "mount", "space", "clock", "latency"):
        assert any(line.split()[1:2] == [name] for line in lines[1:-1]), result.stdout
    assert lines[-1].startswith("verdict: OK")


def test_passes_on_s3(s3_endpoint: Endpoint) -> None:
    env = {"FSRDZV_STORAGE_OPTIONS": json.dumps(s3_endpoint.storage_options)}
    result = doctor(s3_endpoint.url, "--json", "--rounds", "3", "--samples", "3", env=env)
    assert result.returncode == 0, result.stderr
    got = verdicts(result)
    assert got["reach"] == got["cas"] == "pass"
    assert got["lock"] == got["mount"] == "skip"
    assert got["clock"] in {"pass", "warn"}  # moto runs on this host: its LastModified is this clock
    assert got["latency"] in {"pass", "warn"}


def test_fails_on_a_store_that_ignores_conditions(tmp_path: Path) -> None:
    results = run_doctor(
        str(tmp_path), checks=("reach", "cas"), wrap_store=lambda store: FaultyStore(store, ignore_conditions=True)
    )
    cas = next(check for check in results if check.name == "cas")
    assert cas.verdict == "fail" and "2 of 2 conditional writes won" in cas.summary, cas
    assert cas.details["stale_token_refused"] is False


def test_fails_on_a_directory_whose_lock_is_a_no_op(tmp_path: Path) -> None:
    result = doctor(str(tmp_path), "-o", "lock=false", "--json", "--rounds", "2", "--samples", "2")
    assert result.returncode == 1
    got = verdicts(result)
    assert got["lock"] == "fail" and got["cas"] == "pass"  # link(2) keeps CAS exact without the lock
    lock = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "lock")
    assert lock["details"]["excluded"] is False and "lock=false" in lock["summary"]


@pytest.mark.parametrize(
    ("fixture", "path", "code", "verdict", "words"),
    [
        ("mountinfo_nfs_ok.txt", "/shared/rdzv", 0, "PASS", ["/shared (nfs4 from filer01:/export/shared)"]),
        ("mountinfo_nfs_nolock.txt", "/shared/rdzv", 1, "FAIL", ["nolock", "local_lock=all"]),
        ("mountinfo_nfs_nocto.txt", "/shared/rdzv", 1, "FAIL", ["nocto"]),
        ("mountinfo_nfs_caching.txt", "/shared/jobs/rdzv", 0, "WARN", ["acregmin=60", "lookupcache=positive", "soft"]),
        ("mountinfo_lustre_flock.txt", "/lustre/scratch/rdzv", 0, "PASS", ["lustre"]),
        ("mountinfo_lustre_localflock.txt", "/lustre/scratch/rdzv", 1, "FAIL", ["localflock"]),
        ("mountinfo_fuse.txt", "/mnt/gcs bucket/rdzv", 1, "FAIL", ["fuse.gcsfuse", "FUSE"]),
        ("mountinfo_nfs_nolock.txt", "/home/me/rdzv", 0, "PASS", ["/ (ext4"]),
    ],
)
def test_mount_options_from_recorded_mountinfo(
    fixture: str, path: str, code: int, verdict: str, words: list[str]
) -> None:
    # The mount check needs no I/O on the endpoint, so the path need not exist on this machine.
    (mount,) = run_doctor(path, checks=("mount",), mountinfo=str(FIXTURES / fixture))
    assert mount.name == "mount" and mount.verdict == verdict.lower(), mount
    assert (mount.verdict == "fail") == (code == 1)
    for word in words:
        assert word in mount.summary, mount


def test_mountinfo_as_text() -> None:
    (mount,) = run_doctor("/shared/x", checks=("mount",), mountinfo=(FIXTURES / "mountinfo_nfs_nolock.txt").read_text())
    assert mount.verdict == "fail" and "nolock" in mount.summary


def test_mount_check_through_the_cli_reads_this_host(tmp_path: Path) -> None:
    result = doctor(str(tmp_path), "--check", "mount")
    assert result.returncode in (0, 1), result.stderr
    assert result.stdout.splitlines()[1].split()[1] == "mount"


def test_parse_mountinfo_unescapes_and_picks_the_innermost_mount() -> None:
    entries = parse_mountinfo((FIXTURES / "mountinfo_fuse.txt").read_text())
    assert [e.mount_point for e in entries] == ["/", "/mnt/gcs bucket"]
    assert find_mount(entries, "/mnt/gcs bucket/a").fstype == "fuse.gcsfuse"  # type: ignore[union-attr]
    assert find_mount(entries, "/mnt/gcs bucketeer").mount_point == "/"  # type: ignore[union-attr]
    shadowed = parse_mountinfo(
        "1 0 0:1 / / rw - ext4 /dev/a rw\n2 1 0:2 / /s rw - nfs4 a:/x rw,nolock\n3 1 0:3 / /s rw - nfs4 b:/y rw\n"
    )
    entry = find_mount(shadowed, "/s/r")
    assert entry is not None and entry.source == "b:/y" and mount_findings(entry) == []
    assert parse_mountinfo("garbage line\n\n") == []


def test_unreachable_s3_is_one_line() -> None:
    opts = [
        "-o", "endpoint_url=http://127.0.0.1:9", "-o", "key=k", "-o", "secret=s",
        "-o", 'config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2}',
    ]  # fmt: skip
    result = doctor("s3://no-such-bucket/rdzv", *opts)
    assert result.returncode == 3
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("fsrdzv doctor: error: ") and "127.0.0.1:9" in result.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["memory://x"], 2),
        (["/tmp/x", "--check", "nosuch"], 2),
        (["/tmp/x", "--writers", "1"], 2),
        ([], 2),
    ],
)
def test_usage_errors_are_one_line(args: list[str], code: int) -> None:
    env = {"FSRDZV_ENDPOINT": ""}
    result = doctor(*args, env=env)
    assert result.returncode == code
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("fsrdzv"), result.stderr


def test_space_fails_on_a_64_kib_tmpfs_and_passes_on_a_roomy_one(tmp_path: Path) -> None:
    """A 64 KiB tmpfs holds three or four generations of a 4-node run: the doctor says so before a job fills it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small, large = tmp_path / "small", tmp_path / "large"
    mounted = []
    try:
        for path, size in ((small, "64k"), (large, "256m")):
            path.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
                pytest.skip("cannot mount a tmpfs here")
            mounted.append(path)
        got = {c.name: c for c in run_doctor(str(small), checks=("space",))}
        assert got["space"].verdict == "fail" and "ENOSPC" in got["space"].summary
        assert got["space"].details["log_entries_kept"] == 64
        assert run_doctor(str(large), checks=("space",))[0].verdict == "pass"
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
