"""Successful compare-and-set operations per second, with 1 and 8 contending writers, for every built-in store.

    python benchmarks/cas_throughput.py [--seconds 5] [--reps 3] [--stores tmpfs,s3,...] [--profile tmpfs]

Each writer loops "read, then CAS the counter + 1 with the read token" on one shared document, for ``--seconds``
after all writers passed a barrier (process start, imports and store opening are not timed). A run counts the
CAS calls that won; the document's final value must equal that count, so every row is also a linearizability
check. Writers are processes from one pool kept across runs (threads for ``memory://``, which is per process).
Each configuration is repeated ``--reps`` times; the table shows the median and the range of CAS/s.

The emulators (moto, Azurite, fake-gcs-server) are started here with tests/servers.py; their numbers measure
the emulators on this machine, not the cloud services (S3 answers a CAS in 15-70 ms, GCS allows one write per
second per object). Results go to stdout and to benchmarks/results/cas_throughput.md.

``--profile STORE`` instead runs one writer in this process under pyinstrument and prints where the time goes.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fsrdzv.testing import StoreSpec  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "cas_throughput.md"
#: Target of the directory store on tmpfs with 8 writers (CAS/s).
TMPFS_TARGET = 2500.0


@dataclass
class Backend:
    key: str
    label: str
    #: Yields a StoreSpec (and cleans up afterwards); raises RuntimeError with a reason if unavailable.
    open: Callable[[ExitStack], StoreSpec]
    threads: bool = False


def _directory(base: str | None, lock: bool) -> Callable[[ExitStack], StoreSpec]:
    def make(stack: ExitStack) -> StoreSpec:
        if base is not None and not os.path.isdir(base):
            raise RuntimeError(f"{base} does not exist")
        path = tempfile.mkdtemp(prefix="fsrdzv-bench-", dir=base)
        stack.callback(shutil.rmtree, path, True)
        return StoreSpec.at(path, {} if lock else {"lock": False})

    return make


def _server(kind: str) -> Callable[[ExitStack], StoreSpec]:
    def make(stack: ExitStack) -> StoreSpec:
        from tests.servers import ServerUnavailable, start_server

        try:
            server = start_server(kind)
        except ServerUnavailable as exc:
            raise RuntimeError(str(exc).splitlines()[0]) from None
        stack.callback(server.stop)
        spec: StoreSpec = server.endpoint("bench").spec()
        return spec

    return make


def _fs_type(path: str) -> str:
    """The file-system type of the mount holding ``path`` (for the table's labels)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def backends() -> list[Backend]:
    disk = tempfile.gettempdir()
    disk_label = f"directory on disk ({disk}, {_fs_type(disk)})"
    return [
        Backend("disk", disk_label, _directory(None, lock=True)),
        Backend("tmpfs", "tmpfs (/dev/shm)", _directory("/dev/shm", lock=True)),
        Backend("disk-nolock", f"directory without lock ({disk}, {_fs_type(disk)})", _directory(None, lock=False)),
        Backend("tmpfs-nolock", "tmpfs without lock (/dev/shm)", _directory("/dev/shm", lock=False)),
        Backend(
            "memory",
            "memory:// (threads)",
            lambda stack: StoreSpec.at(f"memory://bench-{uuid.uuid4().hex[:8]}"),
            threads=True,
        ),
        Backend("s3", "S3 (moto_server)", _server("s3")),
        Backend("azure", "Azure Blob (Azurite 3.35)", _server("azure")),
        Backend("gcs", "GCS (fake-gcs-server)", _server("gcs")),
    ]


# -- the writer ----------------------------------------------------------------------------------------------


def writer(spec: StoreSpec, run_id: str, seconds: float, barrier: Any) -> tuple[int, int]:
    """Read + CAS the counter until ``seconds`` after the barrier; return (CAS won, CAS attempted)."""
    store = spec.open(run_id)  # opening (and the object stores' self-test) happens before the clock starts
    barrier.wait()
    deadline = time.monotonic() + seconds
    won = attempts = 0
    while time.monotonic() < deadline:
        snap = store.read()
        value = int(snap.data) if snap is not None else 0
        attempts += 1
        if store.compare_and_set(str(value + 1).encode(), None if snap is None else snap.token).won:
            won += 1
    store.close()
    return won, attempts


@dataclass
class Measurement:
    rates: list[float] = field(default_factory=list)
    attempts: int = 0
    won: int = 0
    error: str = ""

    def cell(self) -> str:
        if self.error:
            return f"error: {self.error}"
        if not self.rates:
            return "—"
        med, lo, hi = statistics.median(self.rates), min(self.rates), max(self.rates)
        return f"{med:,.0f} ({lo:,.0f}-{hi:,.0f})"


def measure(
    backend: Backend, spec: StoreSpec, writers: int, seconds: float, pool: Any, manager: Any
) -> tuple[float, int, int]:
    """One run: ``writers`` contending writers for ``seconds``; return (CAS/s, CAS won, CAS attempted)."""
    run_id = "bench-" + uuid.uuid4().hex[:10]
    if backend.threads:
        barrier: Any = threading.Barrier(writers)
        results: list[tuple[int, int]] = []
        lock = threading.Lock()

        def run() -> None:
            outcome = writer(spec, run_id, seconds, barrier)
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=run) for _ in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        barrier = manager.Barrier(writers)
        pending = [pool.apply_async(writer, (spec, run_id, seconds, barrier)) for _ in range(writers)]
        results = [p.get(timeout=seconds + 300) for p in pending]
    won = sum(r[0] for r in results)
    attempts = sum(r[1] for r in results)
    final = spec.open(run_id).read()
    value = int(final.data) if final is not None else 0
    if value != won:
        raise RuntimeError(f"lost updates: counter is {value} after {won} successful CAS")
    return won / seconds, won, attempts


# -- reporting -----------------------------------------------------------------------------------------------


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def render(rows: list[tuple[Backend, dict[int, Measurement]]], args: argparse.Namespace) -> str:
    counts = args.writers
    header = ["store"] + [f"{n} writer{'s' if n > 1 else ''}: CAS/s median (min-max)" for n in counts]
    header.append(f"{max(counts)} writers: CAS won / attempted")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for backend, cells in rows:
        busiest = cells.get(max(counts), Measurement())
        ratio = f"{busiest.won / busiest.attempts:.0%}" if busiest.attempts else "—"
        lines.append("| " + " | ".join([backend.label] + [cells[n].cell() for n in counts] + [ratio]) + " |")
    return "\n".join(lines)


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} (1 min), {five:.1f} (5 min)"


def report(table: str, args: argparse.Namespace, verdict: str, load: tuple[str, str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# CAS throughput",
            "",
            f"Generated by `python benchmarks/cas_throughput.py --seconds {args.seconds:g} --reps {args.reps}` "
            f"on {now}, commit {_commit()}.",
            "",
            f"Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}. Load average before: {load[0]}; after: {load[1]} "
            "(other work on the machine lowers every number).",
            "",
            "Each writer loops read + compare-and-set (counter + 1) on one document for "
            f"{args.seconds:g} s; successful CAS per second over all writers, median and range of {args.reps} "
            "runs. Every run checks that the final counter equals the number of successful CAS (no lost update). "
            "Writers are processes, except memory:// (threads of one process). Emulator rows measure the "
            "emulators on loopback, not the cloud services.",
            "",
            table,
            "",
            verdict,
            "",
        ]
    )


# -- profiling -----------------------------------------------------------------------------------------------


def profile(backend: Backend, seconds: float) -> None:
    from pyinstrument import Profiler

    with ExitStack() as stack:
        spec = backend.open(stack)
        run_id = "profile-" + uuid.uuid4().hex[:8]
        barrier = threading.Barrier(1)
        profiler = Profiler(interval=0.0005)
        profiler.start()
        won, attempts = writer(spec, run_id, seconds, barrier)
        profiler.stop()
        print(f"{backend.label}: {won / seconds:,.0f} CAS/s in one writer ({attempts} attempts)\n")
        print(profiler.output_text(unicode=True, color=False, show_all=False))


# -- main ----------------------------------------------------------------------------------------------------


@contextmanager
def worker_pool(size: int) -> Iterator[tuple[Any, Any]]:
    # spawn, not fork: the object-store SDKs keep threads and event loops that do not survive a fork.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(size) as pool:
        yield pool, manager


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--reps", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 8], help="writer counts (default 1 8)")
    keys = ",".join(b.key for b in backends())
    parser.add_argument("--stores", default="", help=f"comma-separated subset of: {keys}")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.relative_to(REPO)}")
    parser.add_argument("--profile", metavar="STORE", help="profile one writer on STORE with pyinstrument")
    args = parser.parse_args(argv)
    # On SIGTERM unwind like Ctrl-C, so that the pool, the manager and the emulators are stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    available = {b.key: b for b in backends()}
    if args.profile:
        if args.profile not in available:
            parser.error(f"--profile: unknown store {args.profile!r}")
        profile(available[args.profile], args.seconds)
        return 0
    wanted = [k for k in args.stores.split(",") if k] or list(available)
    unknown = [k for k in wanted if k not in available]
    if unknown:
        parser.error(f"unknown store(s) {unknown}; choose from {list(available)}")

    load_before = load_average()
    cpus = os.cpu_count() or 1
    if os.getloadavg()[0] > cpus / 2:
        print(f"warning: load average {load_before} on {cpus} CPUs; the numbers will be low", flush=True)
    rows: list[tuple[Backend, dict[int, Measurement]]] = []
    with worker_pool(max(args.writers)) as (pool, manager):
        for key in wanted:
            backend = available[key]
            cells = {n: Measurement() for n in args.writers}
            rows.append((backend, cells))
            with ExitStack() as stack:
                try:
                    spec = backend.open(stack)
                except RuntimeError as exc:
                    for cell in cells.values():
                        cell.error = f"unavailable ({exc})"
                    print(f"{backend.label}: unavailable: {exc}", flush=True)
                    continue
                for n in args.writers:
                    for _ in range(args.reps):
                        try:
                            rate, won, attempts = measure(backend, spec, n, args.seconds, pool, manager)
                        except Exception as exc:
                            cells[n].error = f"{type(exc).__name__}: {exc}"
                            break
                        cells[n].rates.append(rate)
                        cells[n].won += won
                        cells[n].attempts += attempts
                    print(f"{backend.label}, {n} writer(s): {cells[n].cell()} CAS/s", flush=True)

    table = render(rows, args)
    verdict = ""
    for backend, cells in rows:
        busiest = cells.get(8)
        if backend.key == "tmpfs" and busiest is not None and busiest.rates:
            median = statistics.median(busiest.rates)
            met = "meets" if median >= TMPFS_TARGET else "misses"
            verdict = (
                f"Target: the directory store on tmpfs with 8 writers {met} {TMPFS_TARGET:,.0f} CAS/s "
                f"(median {median:,.0f})."
            )
    print()
    print(table)
    if verdict:
        print()
        print(verdict)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(report(table, args, verdict, (load_before, load_average())))
        print(f"\nwritten to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
