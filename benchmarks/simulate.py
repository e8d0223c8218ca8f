"""Scale simulation: thousands of rendezvous nodes, the real handler code, modelled S3 / GCS / NFS, virtual time.

    .venv/bin/python benchmarks/simulate.py --nodes 256 1024 4096 --models s3 gcs nfs

Every node is a thread running fsrdzv's real ``RendezvousHandler`` on a :class:`fsrdzv.testing.SimStore` (the
in-memory store behind a latency-and-rate model) with a virtual clock (``fsrdzv.testing.VirtualClock``): a node's
``sleep`` and every modelled storage latency block it until virtual time reaches its wake-up, and the scheduler
jumps to the earliest wake-up once every thread is blocked. Times below are virtual seconds; CPU time is not
modelled. All nodes arrive at t=0 unless ``--spread`` says otherwise (the worst case for contention).

Designs:

* ``fsrdzv``: the handler as shipped (``fsrdzv._handler.RendezvousHandler``), with the simulation's clock and
  sleep injected (its per-node read budget and its polls sleep in virtual time too).
* ``naive``: torch's design on the same storage: each node adds itself to the document with its own
  compare-and-set, retrying at once on a conflict, then polls once a second. (torch also writes heartbeats into
  the document, which only makes it worse; they are left out here, so the numbers are a lower bound.)

After formation every node keeps its keep-alive running and calls ``num_nodes_waiting()`` once a second (the
calls between two of the handler's steady reads cost nothing) for ``--steady`` virtual seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from _common import RESULTS, Series, machine_note, markdown_table, max_rate, plot_against_n, section, write_result

from fsrdzv._errors import StorageError
from fsrdzv._handler import RendezvousHandler
from fsrdzv._settings import Settings
from fsrdzv._stores._memory import MemoryStore
from fsrdzv.testing._sim import (
    PRESETS,
    SimCounters,
    SimStorage,
    SimStore,
    StoreModel,
    VirtualClock,
    simulated_handlers,
)

DESIGNS = ("fsrdzv", "naive")
RUN_ID = "sim"


# -- the naive design ------------------------------------------------------------------------------------------


class NaiveNode:
    """torch's join on the modelled storage: one compare-and-set of the whole document per joining node."""

    def __init__(self, store: SimStore, n: int, clock: VirtualClock, rng: random.Random, index: int) -> None:
        self.store, self.n, self.clock, self.rng, self.index = store, n, clock, rng, index

    def join(self) -> int:
        me = f"node-{self.index:05d}"
        snap = self._retry(self.store.read)
        while True:
            doc = json.loads(snap.data) if snap is not None else {"participants": [], "complete": False}
            if me in doc["participants"]:
                break
            if doc["complete"]:
                raise RuntimeError("round complete without this node")
            doc["participants"].append(me)
            doc["complete"] = len(doc["participants"]) >= self.n
            token = None if snap is None else snap.token
            result = self._retry(
                lambda doc=doc, token=token: self.store.compare_and_set(json.dumps(doc).encode(), token)
            )
            snap = result.snapshot
            if result.won:
                break
        while True:  # torch polls the state once a second while it waits
            assert snap is not None
            doc = json.loads(snap.data)
            if doc["complete"]:
                return int(doc["participants"].index(me))
            self.clock.sleep(1.0)
            snap = self._retry(self.store.read)

    def _retry(self, op: Callable[[], Any]) -> Any:
        """Storage errors (throttling) are retried with jittered back-off: this is a lower bound, not torch."""
        attempt = 0
        while True:
            try:
                return op()
            except StorageError:
                self.clock.sleep(self.rng.uniform(0, min(5.0, 0.1 * 2**attempt)))
                attempt += 1


# -- one simulation ----------------------------------------------------------------------------------------------


def run_on_one_cpu() -> None:
    """Keep the simulation's threads on one CPU as batch work (call before the first simulated thread starts).

    Exactly one simulated thread runs at a time and every virtual-time step hands the GIL from one thread to
    another: within one CPU and without wake-up preemption that hand-off costs a fraction of one across CPUs.
    """
    threading.stack_size(512 * 1024)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {_current_cpu()})
    if hasattr(os, "SCHED_BATCH"):
        # No wake-up preemption: the woken thread waits for the GIL anyway, so the waker should run on to park.
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _current_cpu() -> int:
    """The CPU this process runs on now (the kernel's choice: two simulations started together rarely share one)."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return min(os.sched_getaffinity(0))


def _idle_calls(handler: RendezvousHandler, now: float, monitor: float) -> int:
    """How many of a node's next ``num_nodes_waiting()`` calls, one every ``monitor`` s, to make as one sleep.

    Between the steady read coming due and the peer watch's next look, a call reads nothing and answers what
    the previous one did (the default scale-up policy answers from the document as last read), so the loop may
    sleep until the first call at or after the earlier of the two: the same calls reach the storage at the same
    virtual times, with a thread switch per refresh instead of one per second. Without those attributes (another
    handler version), every call is made.
    """
    steady = getattr(getattr(handler, "_steady", None), "_due", None)
    peers = getattr(getattr(handler, "_peers", None), "_next", None)
    if not isinstance(steady, float) or not isinstance(peers, float) or handler.scale_up.policy.deferred:
        return 1
    ahead = min(steady, peers) - now
    return max(1, math.ceil(ahead / monitor - 1e-9)) if math.isfinite(ahead) else 1


# -- one simulation ----------------------------------------------------------------------------------------------


@dataclass
class SimResult:
    model: str
    design: str
    nodes: int
    formed: bool
    formation: float  # virtual s from the last arrival to the last node holding its rank
    formation_ops: SimCounters
    read_rate: float  # max reads/s of one node in any 1-s window while waiting (all reads)
    doc_read_rate: float  # the same for document reads only (polling)
    over_limit: int  # nodes that read more than 20 times in some second while waiting
    document_bytes: int
    steady: SimCounters | None
    steady_seconds: float
    steady_doc_writes: int
    real_seconds: float
    note: str = ""
    errors: list[str] = field(default_factory=list)
    #: With ``kill``: virtual s from the death to the first survivor's num_nodes_waiting() > 0, and to the last
    #: survivor holding its rank in the round without the dead node (NaN: not within the window).
    detected: float = math.nan
    reformed: float = math.nan
    #: Most document reads of all nodes within any 1 s of the steady window.
    doc_peak: float = math.nan


def simulate(
    model: StoreModel,
    design: str,
    n: int,
    *,
    seed: int = 1,
    spread: float = 0.0,
    steady: float = 60.0,
    time_limit: float = 600.0,
    real_limit: float = 600.0,
    kill: bool = False,
    monitor: float = 1.0,
) -> SimResult:
    """One simulation. ``kill``: the last node dies when the steady window starts (min_nodes = N - 1, so the
    survivors form a round without it; each re-rendezvouses once ``num_nodes_waiting()`` is positive, as
    torchrun's agent does). ``monitor``: seconds between two ``num_nodes_waiting()`` calls of a node."""
    clock = VirtualClock()
    storage = SimStorage(model, clock, seed=seed)
    space = f"sim-{secrets.token_hex(4)}"
    settings = Settings(RUN_ID, n - 1 if kill else n, n)
    dying: set[int] = set()
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0.0, spread) for _ in range(n)) if spread > 0 else [0.0] * n
    arrived: dict[int, float] = {}
    done: dict[int, float] = {}
    stores: dict[int, SimStore] = {}
    stop_steady = threading.Event()
    died: list[float] = []
    detected: dict[int, float] = {}
    reformed: dict[int, float] = {}

    def node(i: int) -> None:
        store = storage.open(space, RUN_ID)
        stores[i] = store
        arrived[i] = clock()
        if design == "naive":
            NaiveNode(store, n, clock, random.Random(seed * 100003 + i), i).join()
            done[i] = clock()
            return
        handler = RendezvousHandler(
            store,
            settings,
            local_addr=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
            clock=clock,
            sleep=clock.sleep,
            rng=random.Random(seed * 100003 + i),
            runtime=runtime,
        )
        handler.next_rendezvous()
        done[i] = clock()
        while not stop_steady.is_set():  # torchrun's monitor loop (calls between two refreshes cost nothing)
            clock.sleep(monitor * (1 if i == n - 1 else _idle_calls(handler, clock(), monitor)))
            if i in dying:
                handler._stop_keepalive()
                died.append(clock())
                return
            if handler.num_nodes_waiting() > 0:
                if died:
                    detected.setdefault(i, clock())
                handler.next_rendezvous()
                if died:
                    reformed.setdefault(i, clock())

    # Check the limits often enough: on NFS one virtual second of 4,096 nodes is millions of operations.
    step = min(1.0, 20 * model.read_latency)
    started = time.monotonic()
    note = ""
    steady_ops: SimCounters | None = None
    steady_doc_writes = 0
    doc_peak = math.nan
    formed = False
    with simulated_handlers(clock) as runtime:
        for i in range(n):
            clock.spawn(node, i, name=f"node-{i}", delay=arrivals[i])
        try:
            while len(done) < n and not clock.errors:
                if clock() >= time_limit:
                    note = f"not formed within {time_limit:g} s of virtual time"
                    break
                if time.monotonic() - started > real_limit:
                    note = f"stopped after {real_limit:g} s of real time at virtual {clock():.0f} s"
                    break
                clock.run(until=clock() + step)
            formed = len(done) == n
            formation_ops = storage.total.snapshot()
            if formed and steady > 0 and design != "naive":
                clock.run(until=clock() + 10.0)  # let the last polls and sweeps of the join settle
                before = storage.total.snapshot()
                t0 = clock()
                if kill:
                    dying.add(n - 1)
                while clock() < t0 + steady and not note:  # in steps, to keep the real-time budget
                    clock.run(until=min(t0 + steady, clock() + 10.0))
                    if time.monotonic() - started > real_limit:
                        note = f"steady state stopped after {real_limit:g} s of real time, {clock() - t0:.0f} s in"
                steady_ops = storage.total.snapshot().minus(before)
                steady_doc_writes = steady_ops.cas_won
                reads = [t for st in stores.values() for t in st.doc_read_times if t >= t0]
                doc_peak = max_rate(reads, t0, clock())
        finally:
            stop_steady.set()
            clock.stop()
    errors = [f"{name}: {type(exc).__name__}: {exc}" for name, exc in clock.errors[:3]]
    final = MemoryStore(space, RUN_ID)._read_raw()
    document_bytes = 0 if final is None else len(final[0])
    last_arrival = max(arrived.values()) if arrived else 0.0
    rate = doc_rate = 0.0
    over = 0
    for i, store in stores.items():
        end = done.get(i, clock())
        mine = max_rate(store.read_times, arrived.get(i, 0.0), end)
        over += mine > 20.0
        rate = max(rate, mine)
        doc_rate = max(doc_rate, max_rate(store.doc_read_times, arrived.get(i, 0.0), end))
    return SimResult(
        model=model.name,
        design=design,
        nodes=n,
        formed=formed,
        formation=(max(done.values()) - last_arrival) if formed else math.inf,
        formation_ops=formation_ops,
        read_rate=rate,
        doc_read_rate=doc_rate,
        over_limit=over,
        document_bytes=document_bytes,
        steady=steady_ops,
        steady_seconds=steady,
        steady_doc_writes=steady_doc_writes,
        real_seconds=time.monotonic() - started,
        note=note,
        errors=errors,
        detected=min(detected.values()) - died[0] if died and detected else math.nan,
        reformed=max(reformed.values()) - died[0] if died and len(reformed) == n - 1 else math.nan,
        doc_peak=doc_peak,
    )


# -- the report --------------------------------------------------------------------------------------------------


def _fmt_time(r: SimResult) -> str:
    if r.formed:
        return f"{r.formation:.2f}"
    return f"> {r.note or 'failed'}" + (f" ({r.errors[0][:80]})" if r.errors else "")


def report(results: list[SimResult]) -> tuple[str, str]:
    rows = []
    for r in results:
        ops = r.formation_ops
        rows.append(
            [
                r.model,
                r.design,
                r.nodes,
                _fmt_time(r),
                ops.writes,
                f"{ops.writes / r.nodes:.2f}",
                ops.reads,
                f"{ops.ops['read']} / {ops.ops['list']} ({ops.ops['list_pages']}) / {ops.ops['get']}",
                f"{(ops.reads + ops.writes) / r.nodes:.1f}",
                ops.cas_won,
                ops.cas_lost,
                f"{ops.object_throttled} / {ops.prefix_throttled}",
                f"{r.read_rate:.0f} / {r.doc_read_rate:.0f}",
                r.over_limit,
                f"{r.document_bytes / 1024:.0f}",
                f"{r.real_seconds:.0f}",
            ]
        )
    formation = markdown_table(
        [
            "model",
            "design",
            "N",
            "formation, virtual s",
            "writes",
            "writes / N",
            "reads",
            "reads: document / list (pages) / get",
            "ops / N",
            "document CAS won",
            "CAS lost",
            "throttled (object / prefix)",
            "max reads/s of a node: all / document",
            "nodes over 20 reads/s",
            "document KiB",
            "real s",
        ],
        rows,
    )
    steady_rows = []
    for r in results:
        if r.steady is None:
            continue
        s, secs = r.steady, r.steady_seconds
        steady_rows.append(
            [
                r.model,
                r.design,
                r.nodes,
                f"{s.reads / secs:.0f}",
                f"{s.writes / secs:.0f}",
                r.steady_doc_writes,
                f"{s.ops['list'] / secs:.2f}",
                f"{s.prefix_throttled}",
            ]
        )
    steady = markdown_table(
        [
            "model",
            "design",
            "N",
            "reads/s",
            "writes/s",
            "document writes",
            "lists/s",
            "throttled",
        ],
        steady_rows,
    )
    return formation, steady


def _from_json(raw: dict[str, Any]) -> SimResult:
    raw = dict(raw)
    raw.pop("command", None)
    raw["formation_ops"] = SimCounters(**raw["formation_ops"])
    if raw["steady"] is not None:
        raw["steady"] = SimCounters(**raw["steady"])
    return SimResult(**raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--models", nargs="+", default=["s3", "gcs", "nfs"], choices=sorted(PRESETS))
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--spread", type=float, default=0.0, help="arrivals uniform over this many seconds")
    parser.add_argument("--steady", type=float, default=60.0, help="virtual seconds of stable membership measured")
    parser.add_argument("--time-limit", type=float, default=300.0, help="virtual seconds before giving up a run")
    parser.add_argument(
        "--real-limit",
        nargs="+",
        default=["300"],
        help="real seconds before giving up a run: one number, optionally followed by N:SECONDS for given sizes "
        "(e.g. 900 4096:180)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of every model, e.g. --set prefix_retries=10 (see fsrdzv.testing.StoreModel)",
    )
    parser.add_argument("--raw", help="append every result as a JSON line to this file")
    parser.add_argument(
        "--merge", nargs="+", metavar="RAW", help="simulate nothing: report the results saved by earlier --raw runs"
    )
    parser.add_argument("--out", default="simulation", help="base name of the files under benchmarks/results/")
    parser.add_argument("--no-files", action="store_true")
    args = parser.parse_args(argv)
    run_on_one_cpu()

    results: list[SimResult] = []
    real_limits: dict[int, float] = {}
    default_limit = 300.0
    for item in args.real_limit:
        if ":" in item:
            size, _, secs = item.partition(":")
            real_limits[int(size)] = float(secs)
        else:
            default_limit = float(item)
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        kind = type(getattr(PRESETS["s3"], key))
        overrides[key] = value if kind is str else kind(float(value)) if kind is int else kind(value)
    commands: list[str] = []
    if args.merge:
        for path in args.merge:
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    command = str(record.get("command", "")).replace(sys.executable, "python")
                    if command and command not in commands:
                        commands.append(command)
                    result = _from_json(record)
                    # A later run of the same cell replaces an earlier one (e.g. re-run with a larger real limit).
                    results = [
                        r
                        for r in results
                        if (r.model, r.design, r.nodes) != (result.model, result.design, result.nodes)
                    ]
                    results.append(result)
        models_seen = list(dict.fromkeys(r.model for r in results))
        results.sort(key=lambda r: (models_seen.index(r.model), DESIGNS.index(r.design), r.nodes))
        args.models = models_seen
    for model_name in [] if args.merge else args.models:
        model = PRESETS[model_name].with_(**overrides) if overrides else PRESETS[model_name]
        for design in args.designs:
            for n in args.nodes:
                r = simulate(
                    model,
                    design,
                    n,
                    seed=args.seed,
                    spread=args.spread,
                    steady=args.steady,
                    time_limit=args.time_limit,
                    real_limit=real_limits.get(n, default_limit),
                )
                results.append(r)
                if args.raw:
                    with open(args.raw, "a") as f:
                        f.write(json.dumps({"command": " ".join(sys.argv), **asdict(r)}) + "\n")
                ops = r.formation_ops
                print(
                    f"{r.model:4s} {r.design:9s} N={n:5d} formation {_fmt_time(r):>10s}  writes {ops.writes:7d}"
                    f"  reads {ops.reads:9d}  won/lost {ops.cas_won}/{ops.cas_lost}"
                    f"  throttled {ops.object_throttled}/{ops.prefix_throttled}"
                    f"  max reads/s {r.read_rate:.0f}/{r.doc_read_rate:.0f} ({r.over_limit} nodes > 20/s)"
                    f"  doc {r.document_bytes // 1024} KiB"
                    f"  real {r.real_seconds:.0f} s",
                    flush=True,
                )
    formation, steady = report(results)
    command = "python benchmarks/simulate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if commands:
        command = "` and `".join(c.split("benchmarks/", 1)[-1].join(["python benchmarks/", ""]) for c in commands)
    shown = [m for m in (p.with_(**overrides) for p in PRESETS.values()) if m.name in {r.model for r in results}]
    models = "\n".join(f"- {m.name}: {m}" for m in shown)
    text = (
        f"# Simulation: formation and steady state at scale (virtual time)\n\n"
        f"{section('command', '`' + command.strip() + '`')}\n\n"
        f"Machine (real time only): {machine_note()}\n\nModels:\n\n{section('models', models)}\n\n"
        f"## Formation\n\n{section('formation', formation)}\n\n"
        f"## Steady state ({max([r.steady_seconds for r in results] or [args.steady]):g} virtual s after formation,"
        f" every node calling num_nodes_waiting() each second with its keep-alive running)\n\n"
        f"{section('steady', steady)}\n"
    )
    print()
    print(text)
    if not args.no_files:
        write_result(f"{args.out}.md", text)
        for metric, ylabel, fname in (
            ("time", "virtual seconds, last arrival to all ranks", "time"),
            ("ops", "storage operations per formation", "ops"),
        ):
            series: dict[str, dict[int, Series]] = {}
            for r in results:
                if not r.formed:
                    continue  # a run stopped early has neither a time nor a complete count
                value = r.formation if metric == "time" else float(r.formation_ops.reads + r.formation_ops.writes)
                series.setdefault(f"{r.design} / {r.model}", {}).setdefault(r.nodes, Series()).add(value)
            all_ns = sorted({r.nodes for r in results})
            colors = {"fsrdzv": "tab:green", "naive": "tab:grey"}
            lines = ["-", "--", ":", "-.", (0, (1, 1))]
            models_seen = list(dict.fromkeys(r.model for r in results))
            styles = {
                f"{r.design} / {r.model}": {
                    "color": colors.get(r.design, "tab:blue"),
                    "linestyle": lines[models_seen.index(r.model) % len(lines)],
                    "marker": "osD^v"[models_seen.index(r.model) % 5],
                }
                for r in results
            }
            plot_against_n(
                RESULTS / f"{args.out}_{fname}.png",
                f"Simulated formation: {'time' if metric == 'time' else 'storage operations'}"
                " (all arrive at once; unfinished runs left out)",
                ylabel,
                series,
                reference=("N/15 s (one CAS per node on S3)", {n: n / 15 for n in all_ns})
                if metric == "time"
                else ("10 operations per node", {n: 10.0 * n for n in all_ns}),
                styles=styles,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
