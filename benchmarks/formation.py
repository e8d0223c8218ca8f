"""Formation benchmark: N real local processes (min = max = N) against fsrdzv and torch's own rendezvous.

    .venv/bin/python benchmarks/formation.py --nodes 4 16 32 64 --repeat 5

For every N, repetition and system, N processes are forked; each creates its handler, waits on a barrier, notes
``time.time()`` (its arrival), calls ``next_rendezvous()`` and notes the time again when it holds its rank. All
processes run on this host, so their wall clocks are the same clock. A formation's time is
``max(done) - max(arrival)``: from the last arrival until every node holds its rank.

Systems (each measured in the same run, interleaved so that they share the machine's noise):

* ``fsrdzv-dir``: fsrdzv on a directory of the local disk (ext4, fsync on); ``fsrdzv-tmpfs``: on /dev/shm;
  ``fsrdzv-s3``: on S3 served by moto on 127.0.0.1 (needs fsrdzv's S3 store);
* ``torch-c10d-tcp``: torch 2.13 ``DynamicRendezvousHandler`` with ``C10dRendezvousBackend`` on a TCPStore hosted
  by node 0 (what ``--rdzv-backend=c10d`` does); ``torch-c10d-file``: the same on a FileStore;
* ``torch-etcd-v2``: torch's ``etcd-v2`` backend against Debian's etcd 3.4 with ``--enable-v2``.

Both sides use torch's defaults (join 600 s, last call 30 s — irrelevant at min = max —, keep-alive 5 s x 3).

Storage operations: fsrdzv's are counted below the handler by a wrapper around the store (every document read,
compare-and-set, record put/get/list/delete that reaches the storage). torch's are its backend's ``get_state``
and ``set_state`` calls (the state reads and compare-and-sets; the two MASTER_ADDR/PORT bootstrap keys per node
that torch reads from the same store are not counted). "max reads/s" is the largest number of read operations a
single node made within any one-second window while it waited.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from _common import (
    RESULTS,
    SERVER_PIDS,
    CountingStore,
    Series,
    ServerUnavailable,
    collect_results,
    etcd_server,
    free_port,
    machine_note,
    markdown_table,
    max_rate,
    moto_server,
    plot_against_n,
    process_cpu,
    reads,
    section,
    write_result,
    writes,
)

#: Experiments (not fsrdzv as shipped) on real processes: ``nolock`` opens the directory store with ``lock=False``;
#: ``flatpoll`` keeps the poll at its fastest while a round forms.
VARIANTS = ("nolock", "flatpoll")
SYSTEMS = ("fsrdzv-dir", "fsrdzv-tmpfs", "fsrdzv-s3", "torch-c10d-tcp", "torch-c10d-file", "torch-etcd-v2")
BASELINE = "torch-c10d-tcp"
#: Reads per second a waiting node should stay under (issue 3).
READ_LIMIT = 20.0
#: Seconds a formation may take before it is abandoned (torch's join timeout is 600 s; this run has no patience).
FORMATION_TIMEOUT = 120.0

CTX = multiprocessing.get_context("fork")


@dataclass
class Target:
    """Where one formation runs."""

    system: str
    run_id: str
    nodes: int
    endpoint: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    #: Directory where each node saves a pyinstrument session of its next_rendezvous (empty: no profiling).
    profile: str = ""
    #: Record every storage operation's start and end (fsrdzv systems), for ``--timeline``.
    timeline: bool = False
    timeline_text: str = ""


# -- the node processes ----------------------------------------------------------------------------------------


def _fsrdzv_handler(t: Target) -> tuple[Any, Any]:
    from fsrdzv import _handler, _periods
    from fsrdzv._settings import Settings
    from fsrdzv._stores import open_store

    variants = set(t.system.split("+")[1:])
    options = dict(t.options)
    if "nolock" in variants:
        options["lock"] = False
    if "flatpoll" in variants:
        _periods.POLL_GROWTH = 1.0  # type: ignore[misc]
    store = CountingStore(open_store(t.endpoint, t.run_id, storage_options=options))
    if t.timeline:
        store.timeline()
    handler = _handler.RendezvousHandler(store, Settings(t.run_id, t.nodes, t.nodes), local_addr="127.0.0.1")
    return handler, store


class _TorchCounter:
    """Counts the backend's state reads and writes (and when the reads happened)."""

    def __init__(self, backend: Any) -> None:
        self.ops = {"read": 0, "cas": 0}
        self.read_times: list[float] = []
        self.doc_read_times = self.read_times
        self.write_times: list[float] = []
        self.doc_writes = 0
        get_state, set_state = backend.get_state, backend.set_state

        def counted_get() -> Any:
            self.ops["read"] += 1
            self.read_times.append(time.time())
            return get_state()

        def counted_set(state: bytes, token: Any = None) -> Any:
            self.ops["cas"] += 1
            result = set_state(state, token)
            if result is not None and result[2]:  # (state, token, has_set)
                self.doc_writes += 1
                self.write_times.append(time.time())
            return result

        backend.get_state = counted_get
        backend.set_state = counted_set


def _torch_handler(t: Target, index: int) -> tuple[Any, Any]:
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    if t.system == "torch-etcd-v2":
        from torch.distributed.elastic.rendezvous import etcd_rendezvous_backend as etcd_backend

        params = RendezvousParameters("etcd-v2", t.endpoint, t.run_id, t.nodes, t.nodes, local_addr="127.0.0.1")
        backend, store = etcd_backend.create_backend(params)
    else:
        from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as c10d

        extra: dict[str, Any] = {"store_type": "tcp", "is_host": index == 0, "read_timeout": 120}
        if t.system == "torch-c10d-file":
            extra = {"store_type": "file"}
        params = RendezvousParameters("c10d", t.endpoint, t.run_id, t.nodes, t.nodes, local_addr="127.0.0.1", **extra)
        backend, store = c10d.create_backend(params)
    counter = _TorchCounter(backend)
    handler = create_handler(store, backend, params)
    return handler, counter


#: Samples of the 4-request floor of an S3 formation (each measured at the start and the end of the run).
FLOOR_SAMPLES = 20


def _system(name: str) -> str:
    base, *variants = name.split("+")
    if base not in SYSTEMS or (variants and not base.startswith("fsrdzv")) or set(variants) - set(VARIANTS):
        raise argparse.ArgumentTypeError(f"unknown system {name!r}")
    return name


def _node(
    t: Target,
    index: int,
    start: multiprocessing.synchronize.Barrier,
    done: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    code = 0
    try:
        if t.system.startswith("fsrdzv"):
            handler, counter = _fsrdzv_handler(t)
        else:
            handler, counter = _torch_handler(t, index)
        start.wait(timeout=FORMATION_TIMEOUT)
        profiler = None
        if t.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0002)
            profiler.start()
        cpu = time.process_time()
        arrival = time.time()
        info = handler.next_rendezvous()
        finished = time.time()
        cpu = time.process_time() - cpu
        if profiler is not None:
            profiler.stop()
            profiler.last_session.save(os.path.join(t.profile, f"{t.run_id}-{index}.pyisession"))
        results.put(
            {
                "index": index,
                "arrival": arrival,
                "done": finished,
                "rank": info.rank,
                "world": info.world_size,
                "ops": dict(counter.ops),
                "doc_writes": counter.doc_writes,
                "write_times": counter.write_times,
                "read_rate": max_rate(counter.read_times, arrival, finished),
                "doc_read_rate": max_rate(counter.doc_read_times, arrival, finished),
                "cpu": cpu,
                "wait": finished - arrival,
                "events": getattr(counter, "events", None),
            }
        )
        # Nobody leaves before everyone holds a rank: a node that closed the run early would disturb the others.
        done.wait(timeout=FORMATION_TIMEOUT)
    except BaseException as exc:  # report every failure to the driver, then die
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        code = 1
    finally:
        # Flush the queue's feeder thread first: os._exit would drop a result still in its buffer.
        results.close()
        results.join_thread()
        sys.stdout.flush()
        os._exit(code)  # skip interpreter teardown (torch's and fsrdzv's daemon threads, atexit hooks)


# -- the driver -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    seconds: float
    reads: int
    writes: int
    doc_writes: int
    read_rate: float
    doc_read_rate: float
    over_limit: int
    to_complete: float
    notice: float
    cpu: float
    server_cpu: float
    #: From the first arrival until every node holds its rank (s): the nodes' CPU is spent in this window.
    window: float
    ranks_ok: bool
    by_kind: dict[str, int]


def run_formation(t: Target) -> Outcome:
    # The driver passes both barriers too: the server's CPU is counted from the nodes' start to their end.
    start = CTX.Barrier(t.nodes + 1)
    done = CTX.Barrier(t.nodes + 1)
    results: multiprocessing.Queue = CTX.Queue()  # type: ignore[type-arg]
    procs = [CTX.Process(target=_node, args=(t, i, start, done, results), daemon=True) for i in range(t.nodes)]
    for p in procs:
        p.start()
    server = SERVER_PIDS.get("moto") if t.system.startswith("fsrdzv-s3") else None
    server_cpu = 0.0
    with contextlib.suppress(threading.BrokenBarrierError):  # a node that failed reports why below
        start.wait(timeout=FORMATION_TIMEOUT)
        before = process_cpu(server) if server else 0.0
        done.wait(timeout=FORMATION_TIMEOUT)
        server_cpu = process_cpu(server) - before if server else 0.0
    got = collect_results(procs, results, t.nodes, time.monotonic() + FORMATION_TIMEOUT + 30, f"{t.system} N={t.nodes}")
    ranks = sorted(r["rank"] for r in got)
    ok = ranks == list(range(t.nodes)) and all(r["world"] == t.nodes for r in got)
    last_arrival = max(r["arrival"] for r in got)
    first_done = min(r["done"] for r in got)
    commits = [w for r in got for w in r["write_times"] if w <= first_done]
    completed = max(commits) if commits else first_done
    if t.timeline:
        t.timeline_text = _timeline(t, got, last_arrival)
    return Outcome(
        seconds=max(r["done"] for r in got) - last_arrival,
        reads=sum(reads(r["ops"]) for r in got),
        writes=sum(writes(r["ops"]) for r in got),
        doc_writes=sum(r["doc_writes"] for r in got),
        read_rate=max(r["read_rate"] for r in got),
        doc_read_rate=max(r["doc_read_rate"] for r in got),
        over_limit=sum(r["read_rate"] > READ_LIMIT for r in got),
        to_complete=completed - last_arrival,
        notice=max(r["done"] for r in got) - completed,
        cpu=sum(r["cpu"] for r in got),
        server_cpu=server_cpu,
        window=max(r["done"] for r in got) - min(r["arrival"] for r in got),
        ranks_ok=ok,
        by_kind={k: sum(r["ops"].get(k, 0) for r in got) for k in got[0]["ops"]},
    )


def _timeline(t: Target, got: list[dict[str, Any]], last_arrival: float) -> str:
    """Every storage operation of every node, and when each node held its rank, in ms from the last arrival."""
    rows = sorted(
        (start - last_arrival, end - last_arrival, r["index"], what)
        for r in got
        for start, end, what in r["events"] or ()
    )
    rows += sorted((r["done"] - last_arrival, r["done"] - last_arrival, r["index"], "holds its rank") for r in got)
    arrivals = [r["arrival"] - last_arrival for r in got]
    lines = [f"# {t.system} N={t.nodes}: arrivals from {1e3 * min(arrivals):.1f} ms; start ms, end ms, node, operation"]
    lines += [f"{1e3 * a:9.1f} {1e3 * b:9.1f}  n{i:03d}  {what}" for a, b, i, what in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Cell:
    seconds: Series = field(default_factory=Series)
    reads: Series = field(default_factory=Series)
    writes: Series = field(default_factory=Series)
    doc_writes: Series = field(default_factory=Series)
    read_rate: Series = field(default_factory=Series)
    doc_read_rate: Series = field(default_factory=Series)
    over_limit: Series = field(default_factory=Series)
    to_complete: Series = field(default_factory=Series)
    notice: Series = field(default_factory=Series)
    cpu: Series = field(default_factory=Series)
    server_cpu: Series = field(default_factory=Series)
    busy: Series = field(default_factory=Series)
    error: str = ""


def _combine_profiles(directory: str, out: str) -> None:
    from pyinstrument.renderers import ConsoleRenderer
    from pyinstrument.session import Session

    sessions = [Session.load(os.path.join(directory, f)) for f in sorted(os.listdir(directory))]
    if not sessions:
        return
    combined = sessions[0]
    for other in sessions[1:]:
        combined = Session.combine(combined, other)
    text = ConsoleRenderer(unicode=False, color=False, show_all=False, time="percent_of_total").render(combined)
    with open(out, "w") as f:
        f.write(f"pyinstrument, {len(sessions)} node sessions combined\n{text}")
    print(f"combined profile of {len(sessions)} nodes written to {out}", flush=True)


def _prepare(
    systems: list[str], stack: contextlib.ExitStack, unavailable: dict[str, str], s3_latency: float = 0.0
) -> dict[str, Any]:
    """Start what the systems need; a system that cannot run is recorded with the reason, never faked."""
    env: dict[str, Any] = {}
    systems = sorted({s.split("+")[0] for s in systems})
    if any(s.startswith("fsrdzv") for s in systems):
        import fsrdzv  # noqa: F401 - import before forking, so the children do not pay for it
    if "fsrdzv-dir" in systems:
        env["dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="fsrdzv-bench-", dir="/var/tmp"))
    if "fsrdzv-tmpfs" in systems:
        if os.path.isdir("/dev/shm"):
            env["tmpfs"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="fsrdzv-bench-", dir="/dev/shm"))
        else:
            unavailable["fsrdzv-tmpfs"] = "no /dev/shm"
    if "fsrdzv-s3" in systems:
        try:
            endpoint, options = stack.enter_context(moto_server(s3_latency))
            # Probe in a child: s3fs's event-loop thread must not exist in the parent that forks the nodes.
            probe = CTX.Process(target=_probe, args=(endpoint, options))
            probe.start()
            probe.join(timeout=60)
            if probe.exitcode != 0:
                raise ServerUnavailable(f"fsrdzv could not open {endpoint} on moto (exit code {probe.exitcode})")
            env["s3"] = (endpoint, options)
        except Exception as exc:  # report why, whatever it is
            unavailable["fsrdzv-s3"] = f"not run: {type(exc).__name__}: {exc}".replace("\n", " ")[:200]
    if any(s.startswith("torch") for s in systems):
        # Import torch's rendezvous before forking so that each child does not spend seconds importing it.
        from torch.distributed.elastic.rendezvous import (  # noqa: F401
            c10d_rendezvous_backend,
            dynamic_rendezvous,
        )
    if "torch-c10d-file" in systems:
        env["tfile"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="fsrdzv-bench-tfile-", dir="/var/tmp"))
    if "torch-etcd-v2" in systems:
        try:
            from torch.distributed.elastic.rendezvous import etcd_rendezvous_backend  # noqa: F401

            host, port = stack.enter_context(etcd_server())
            env["etcd"] = f"{host}:{port}"
        except (ImportError, ServerUnavailable, OSError) as exc:
            unavailable["torch-etcd-v2"] = f"not run: {type(exc).__name__}: {exc}"[:200]
    return env


def _floor_child(endpoint: str, options: dict[str, Any], out: Any) -> None:
    """The floor of a formation on this S3 endpoint: 4 sequential requests (a record PUT, a LIST, a CAS, a GET)."""
    from fsrdzv._stores import open_store

    store = open_store(endpoint, f"floor-{uuid.uuid4().hex[:8]}", storage_options=options)
    snap = store.compare_and_set(b"0", None).snapshot
    times = []
    for i in range(FLOOR_SAMPLES + 2):
        started = time.perf_counter()
        store.put_record("req", f"floor-{i}", b"x")
        store.list_records("req")
        assert snap is not None
        snap = store.compare_and_set(str(i).encode(), snap.token).snapshot
        store.read()
        if i >= 2:  # the first two warm the connections
            times.append(time.perf_counter() - started)
    store.delete_run()
    out.put(statistics.median(times))


def _floor(env: dict[str, Any]) -> float:
    endpoint, options = env["s3"]
    out: multiprocessing.Queue = CTX.Queue()  # type: ignore[type-arg]
    child = CTX.Process(target=_floor_child, args=(endpoint, options, out))
    child.start()
    value: float = out.get(timeout=120)
    child.join(timeout=60)
    return value


def _probe(endpoint: str, options: dict[str, Any]) -> None:
    from fsrdzv._stores import open_store

    open_store(endpoint, "probe", storage_options=options).read()


def _target(full: str, n: int, env: dict[str, Any]) -> Target:
    system = full.split("+")[0]
    run_id = f"bench-{system}-{n}-{uuid.uuid4().hex[:8]}"
    t = _base_target(system, run_id, n, env)
    t.system = full
    return t


def _base_target(system: str, run_id: str, n: int, env: dict[str, Any]) -> Target:
    if system == "fsrdzv-dir":
        return Target(system, run_id, n, env["dir"])
    if system == "fsrdzv-tmpfs":
        return Target(system, run_id, n, env["tmpfs"])
    if system == "fsrdzv-s3":
        endpoint, options = env["s3"]
        return Target(system, run_id, n, endpoint, options)
    if system == "torch-c10d-tcp":
        port = free_port()
        return Target(system, run_id, n, f"127.0.0.1:{port}", port=port)
    if system == "torch-c10d-file":
        return Target(system, run_id, n, os.path.join(env["tfile"], run_id))
    if system == "torch-etcd-v2":
        return Target(system, run_id, n, env["etcd"])
    raise ValueError(system)


def report(
    cells: dict[tuple[str, int], Cell], systems: list[str], nodes: list[int], unavailable: dict[str, str]
) -> str:
    headers = [
        "system",
        "N",
        "formation s, median (min-max)",
        "speed-up vs torch c10d-tcp",
        "writes per formation",
        "writes / N",
        "reads per formation",
        "max reads/s of a node: all reads / document reads",
        "nodes over 20 reads/s (median)",
        "document writes won",
    ]
    rows: list[list[object]] = []
    detail: list[list[object]] = []
    for system in systems:
        if system in unavailable:
            rows.append([system, "all", unavailable[system], "", "", "", "", "", "", ""])
            continue
        for n in nodes:
            cell = cells.get((system, n))
            if cell is None:
                continue
            if cell.error and not cell.seconds.values:
                rows.append([system, n, f"failed: {cell.error[:120]}", "", "", "", "", "", "", ""])
                continue
            base = cells.get((BASELINE, n))
            ratio = ""
            if base is not None and base.seconds.values and cell.seconds.median > 0:
                ratio = f"{base.seconds.median / cell.seconds.median:.1f}x"
            rows.append(
                [
                    system,
                    n,
                    cell.seconds.fmt() + (f" ({cell.error[:60]})" if cell.error else ""),
                    ratio,
                    cell.writes.fmt("n"),
                    f"{cell.writes.median / n:.2f}",
                    cell.reads.fmt("n"),
                    f"{cell.read_rate.hi:.0f} / {cell.doc_read_rate.hi:.0f}",
                    f"{cell.over_limit.median:.0f}",
                    f"{cell.doc_writes.median:.0f}",
                ]
            )
            detail.append(
                [
                    system,
                    n,
                    f"{cell.to_complete.median:.3f}",
                    f"{cell.notice.median:.3f}",
                    f"{cell.cpu.median:.2f}",
                    f"{cell.server_cpu.median:.2f}" if system.startswith("fsrdzv-s3") else "-",
                    f"{100 * cell.busy.median:.0f} %",
                ]
            )
    breakdown = markdown_table(
        [
            "system",
            "N",
            "last arrival -> completing write, s (median)",
            "completing write -> last node holds its rank, s (median)",
            "CPU s of all nodes in next_rendezvous (median)",
            "CPU s of the moto server (median)",
            "share of the machine's CPU used from the first arrival on: (nodes + moto) / (CPUs x time), median",
        ],
        detail,
    )
    return markdown_table(headers, rows) + "\n\nWhere the time goes:\n\n" + breakdown


def targets(cells: dict[tuple[str, int], Cell]) -> list[str]:
    """Issue 3's local targets at N = 32 (directory and tmpfs; an object store is not "local")."""
    out = []
    for system in sorted({s for s, n in cells if n == 32 and s.split("+")[0] in ("fsrdzv-dir", "fsrdzv-tmpfs")}):
        cell = cells[(system, 32)]
        if not cell.seconds.values:
            continue
        med = cell.seconds.median
        out.append(f"- {system} N=32 median {med:.3f} s: {'met' if med <= 0.1 else 'MISSED'} (target <= 0.1 s)")
        base = cells.get((BASELINE, 32))
        if base is not None and base.seconds.values:
            speedup = base.seconds.median / med
            verdict = "met" if speedup >= 15 else "MISSED"
            out.append(f"  - {speedup:.1f}x faster than torch c10d TCPStore in the same run: {verdict} (target >= 15x)")
        w = cell.writes.hi
        out.append(
            f"  - writes per formation max {w:.0f} = {w / 32:.2f} N: {'met' if w <= 4 * 32 else 'MISSED'} (<= 4N)"
        )
        r = cell.read_rate.hi
        over = cell.over_limit.hi
        out.append(
            f"  - max reads/s of a waiting node {r:.0f}, up to {over:.0f} nodes over {READ_LIMIT:g}/s: "
            f"{'met' if r <= READ_LIMIT else 'MISSED'} (<= {READ_LIMIT:g}/s)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 16, 32, 64])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--systems",
        nargs="+",
        default=list(SYSTEMS),
        type=_system,
        help=f"any of {', '.join(SYSTEMS)}; an fsrdzv system may carry experiment suffixes "
        f"({', '.join('+' + v for v in VARIANTS)}), e.g. fsrdzv-dir+nolock: see docs/performance.md",
    )
    parser.add_argument("--out", default="formation", help="base name of the files under benchmarks/results/")
    parser.add_argument("--no-files", action="store_true", help="print only; write no result files")
    parser.add_argument(
        "--timeline",
        metavar="FILE",
        help="write every storage operation of every fsrdzv node (start, end, node, operation, in ms from the last "
        "arrival) of every formation to FILE: where the time of a formation goes",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="profile every node's next_rendezvous with pyinstrument and write the combined profile (text) to FILE",
    )
    parser.add_argument(
        "--s3-latency",
        type=float,
        default=0.0,
        metavar="MS",
        help="moto answers every request MS milliseconds later (a sleep: no CPU), a model of S3's own round trip; "
        "the floor is measured through the same server",
    )
    args = parser.parse_args(argv)

    unavailable: dict[str, str] = {}
    cells: dict[tuple[str, int], Cell] = {}
    timelines: list[str] = []
    with contextlib.ExitStack() as stack:
        env = _prepare(args.systems, stack, unavailable, args.s3_latency)
        profile_dir = stack.enter_context(tempfile.TemporaryDirectory()) if args.profile else ""
        for s in args.systems:
            if s.split("+")[0] in unavailable:
                unavailable[s] = unavailable[s.split("+")[0]]
        runnable = [s for s in args.systems if s not in unavailable]
        floors = [_floor(env)] if "fsrdzv-s3" in runnable else []
        for reason in unavailable.items():
            print("unavailable:", *reason, flush=True)
        for n in args.nodes:
            for rep in range(args.repeat):
                for system in runnable:
                    cell = cells.setdefault((system, n), Cell())
                    if cell.error and not cell.seconds.values and rep > 0:
                        continue  # it failed every time so far: do not spend minutes failing again
                    t = _target(system, n, env)
                    if profile_dir:
                        t.profile = profile_dir
                    t.timeline = bool(args.timeline) and system.startswith("fsrdzv")
                    try:
                        o = run_formation(t)
                    except RuntimeError as exc:
                        cell.error = str(exc)
                        print(f"N={n:3d} rep {rep} {system:16s} FAILED {exc}", flush=True)
                        continue
                    finally:
                        if system == "torch-c10d-file":
                            with contextlib.suppress(OSError):
                                os.unlink(t.endpoint)
                        if system in ("fsrdzv-dir", "fsrdzv-tmpfs"):
                            shutil.rmtree(os.path.join(t.endpoint, t.run_id), ignore_errors=True)
                    if t.timeline_text:
                        timelines.append(f"# repetition {rep}\n{t.timeline_text}")
                    if not o.ranks_ok:
                        cell.error = "ranks were not 0..N-1"
                    cell.seconds.add(o.seconds)
                    cell.reads.add(o.reads)
                    cell.writes.add(o.writes)
                    cell.doc_writes.add(o.doc_writes)
                    cell.read_rate.add(o.read_rate)
                    cell.doc_read_rate.add(o.doc_read_rate)
                    cell.over_limit.add(o.over_limit)
                    cell.to_complete.add(o.to_complete)
                    cell.notice.add(o.notice)
                    cell.cpu.add(o.cpu)
                    cell.server_cpu.add(o.server_cpu)
                    cell.busy.add((o.cpu + o.server_cpu) / ((os.cpu_count() or 1) * o.window))
                    print(
                        f"N={n:3d} rep {rep} {system:16s} {o.seconds:8.3f} s  writes {o.writes:5d}  reads {o.reads:6d}"
                        f"  doc CAS {o.doc_writes:4d}  max reads/s {o.read_rate:4.0f} (document {o.doc_read_rate:3.0f},"
                        f" {o.over_limit} nodes > {READ_LIMIT:g}/s)"
                        f"  complete +{o.to_complete:.3f} s, seen +{o.notice:.3f} s, cpu {o.cpu:.2f} s  {o.by_kind}",
                        flush=True,
                    )
        if floors:
            floors.append(_floor(env))
        if profile_dir:
            _combine_profiles(profile_dir, args.profile)
        if args.timeline:
            with open(args.timeline, "w") as f:
                f.write("\n".join(timelines))
            print(f"timelines of {len(timelines)} formations written to {args.timeline}", flush=True)
    table = report(cells, args.systems, args.nodes, unavailable)
    verdicts = targets(cells)
    if floors:
        floor = statistics.median(floors)
        verdicts.append(
            f"S3 floor (moto{f' answering {args.s3_latency:g} ms later' if args.s3_latency else ''}, this run): "
            f"4 sequential requests (record PUT, LIST, CAS, GET) take "
            f"{floor * 1000:.1f} ms (median of {FLOOR_SAMPLES}, measured before and after: "
            f"{', '.join(f'{f * 1000:.1f}' for f in floors)} ms)"
        )
        for n in args.nodes:
            cell = cells.get(("fsrdzv-s3", n))
            if cell is not None and cell.seconds.values:
                ratio = cell.seconds.median / floor
                verdicts.append(
                    f"fsrdzv-s3 N={n}: formation {cell.seconds.median * 1000:.0f} ms = {ratio:.1f}x the floor "
                    f"(goal <= 3x: {'met' if ratio <= 3 else 'missed'})"
                )
    note = machine_note()
    command = "python benchmarks/formation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    main_table, _, breakdown = table.partition("\n\nWhere the time goes:\n\n")
    text = (
        f"# Formation: N local processes, min = max = N\n\n{section('command', '`' + command.strip() + '`')}\n\n"
        f"Machine: {section('machine', note)}\n\n{section('table', main_table)}\n\nWhere the time goes:\n\n"
        f"{section('breakdown', breakdown)}\n\n{section('verdicts', chr(10).join(verdicts) or '(no N=32 row)')}\n"
    )
    print()
    print(text)
    if not args.no_files:
        write_result(f"{args.out}.md", text)
    if not args.no_files and len(args.nodes) > 1:  # a plot against N needs more than one N
        series_t = {s: {n: cells[(s, n)].seconds for n in args.nodes if (s, n) in cells} for s in args.systems}
        series_w = {s: {n: cells[(s, n)].writes for n in args.nodes if (s, n) in cells} for s in args.systems}
        plot_against_n(
            RESULTS / f"{args.out}_time.png",
            "Formation time, last arrival to all ranks (min=max=N, local processes)",
            "seconds (median, min-max)",
            series_t,
        )
        plot_against_n(
            RESULTS / f"{args.out}_writes.png",
            "Storage writes per formation",
            "writes (median, min-max)",
            series_w,
            reference=("4N", {n: 4.0 * n for n in args.nodes}),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
