"""What ``fsrdzv.safe_point()`` costs a training step, and how many storage operations it makes.

Three situations, on a directory (disk), tmpfs (/dev/shm) and S3 (moto on 127.0.0.1):

* *nothing held back*: no newcomer waits (the agent's flag file is absent): the steady state of every step;
* *held back, repeated*: a newcomer waits and the worker calls every step; calls within ``MIN_INTERVAL`` of the
  last write return without writing;
* *held back, writing*: the calls that write the node's ``sp`` record (one ``MIN_INTERVAL`` apart).

torch has no safe-point call (its agent restarts the workers as soon as a node waits), so there is no torch row.

    .venv/bin/python benchmarks/safe_point.py [--calls 2000] [--writes 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import CountingStore, ServerUnavailable, machine_note, markdown_table, moto_server, section, write_result

import fsrdzv
from fsrdzv import _safepoint

stores: list[CountingStore] = []


def _counting_open_store(*args: Any, **kwargs: Any) -> CountingStore:
    store = CountingStore(fsrdzv.open_store(*args, **kwargs))
    stores.append(store)
    return store


@contextlib.contextmanager
def _worker_env(endpoint: str, options: dict[str, Any], flag: Path) -> Iterator[None]:
    import json

    saved = dict(os.environ)
    os.environ.update(
        {
            "FSRDZV_ENDPOINT": endpoint,
            "FSRDZV_RUN_ID": "bench-sp",
            "FSRDZV_NODE_ID": "node-0",
            "FSRDZV_ROUND": "3",
            "FSRDZV_SAFE_POINT_FILE": str(flag),
            "LOCAL_RANK": "0",
        }
    )
    if options:
        os.environ["FSRDZV_STORAGE_OPTIONS"] = json.dumps(options)
    _safepoint._markers.clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _timed(calls: int, pause: float = 0.0) -> tuple[list[float], int]:
    times, wrote = [], 0
    for _ in range(calls):
        if pause:
            time.sleep(pause)
        start = time.perf_counter()
        wrote += fsrdzv.safe_point()
        times.append(time.perf_counter() - start)
    return times, wrote


def _ops() -> tuple[int, int]:
    counts = {"read": 0, "write": 0}
    for store in stores:
        for kind, n in store.ops.items():
            counts["read" if kind in ("read", "get", "list") else "write"] += n
    return counts["read"], counts["write"]


def measure(name: str, endpoint: str, options: dict[str, Any], calls: int, writes: int) -> list[list[object]]:
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        flag = Path(tmp) / "wanted"
        with _worker_env(endpoint, options, flag):
            stores.clear()
            times, wrote = _timed(calls)
            rows.append([name, "nothing held back", calls, *_stats(times), wrote, *_ops()])
            flag.write_text("")
            _timed(1)  # opens the store (once per process)
            stores_before = _ops()
            times, wrote = _timed(calls)
            reads, writes_made = (a - b for a, b in zip(_ops(), stores_before, strict=True))
            rows.append([name, "held back, repeated", calls, *_stats(times), wrote, reads, writes_made])
            stores_before = _ops()
            times, wrote = _timed(writes, pause=_safepoint.MIN_INTERVAL)
            reads, writes_made = (a - b for a, b in zip(_ops(), stores_before, strict=True))
            rows.append([name, "held back, writing", writes, *_stats(times), wrote, reads, writes_made])
    return rows


def _stats(times: list[float]) -> tuple[str, str]:
    ordered = sorted(times)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"{statistics.median(times) * 1e3:.3f}", f"{p90 * 1e3:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--writes", type=int, default=20)
    parser.add_argument("--no-files", action="store_true")
    args = parser.parse_args()
    _safepoint.open_store = _counting_open_store  # type: ignore[assignment]
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(dir=str(Path.cwd())) as disk:
        rows += measure("directory (disk)", disk, {}, args.calls, args.writes)
    if os.path.isdir("/dev/shm"):
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            rows += measure("directory (tmpfs)", shm, {}, args.calls, args.writes)
    try:
        with moto_server() as (url, options):
            rows += measure("S3 (moto, local)", url, options, max(50, args.calls // 10), args.writes)
    except ServerUnavailable as exc:
        rows.append(["S3 (moto, local)", f"not run: {exc}", "", "", "", "", "", ""])
    headers = ["storage", "situation", "calls", "median ms", "p90 ms", "writing calls", "reads", "writes"]
    table = markdown_table(headers, rows)
    text = f"# fsrdzv.safe_point() cost\n\n{machine_note()}\n\n{section('safe_point', table)}\n"
    sys.stdout.write(text)
    if not args.no_files:
        write_result("safe_point.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
