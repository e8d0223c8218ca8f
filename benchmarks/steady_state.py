"""Steady state: N local processes (default 32) hold a formed round; what does that cost the storage?

    .venv/bin/python benchmarks/steady_state.py --nodes 32 --seconds 60

Each node forms a round (min = max = N), then behaves like torchrun's agent while its workers run: it calls
``num_nodes_waiting()`` every 0.1 s (the agent's ``monitor_interval``) while its keep-alive runs (every 5 s,
torch's default). After a 2-second settling pause, every node counts the storage operations it makes during the
next ``--seconds`` seconds. Reported: reads and writes per second on the storage (all nodes together) and the
writes to the shared document (fsrdzv's target: 0 — heartbeats go to each node's own record). For fsrdzv, node 0
also reads the document's generation at both ends of the window, bypassing the counters, as an independent check.

torch's c10d backend is measured the same way for comparison: its keep-alives are compare-and-sets of the shared
state, and ``num_nodes_waiting`` reads the state (1 s cache) — storage operations are its backend's
``get_state``/``set_state`` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing.synchronize
import os
import sys
import time
import traceback
from typing import Any

from _common import Series, collect_results, machine_note, markdown_table, reads, section, write_result, writes
from formation import CTX, FORMATION_TIMEOUT, SYSTEMS, Target, _fsrdzv_handler, _prepare, _target, _torch_handler

SETTLE = 2.0
MONITOR_INTERVAL = 0.1


def _node(
    t: Target,
    index: int,
    seconds: float,
    start: multiprocessing.synchronize.Barrier,
    formed: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    code = 0
    try:
        if t.system.startswith("fsrdzv"):
            handler, counter = _fsrdzv_handler(t)
        else:
            handler, counter = _torch_handler(t, index)
        start.wait(timeout=FORMATION_TIMEOUT)
        handler.next_rendezvous()
        formed.wait(timeout=FORMATION_TIMEOUT)
        w0 = time.time() + SETTLE
        w1 = w0 + seconds
        first: tuple[dict[str, int], int, int] | None = None

        def snapshot() -> tuple[dict[str, int], int, int]:
            generation = -1
            if index == 0 and t.system.startswith("fsrdzv"):
                snap = counter.inner.read()  # the store below the counters: not counted
                generation = -1 if snap is None else snap.generation
            return dict(counter.ops), counter.doc_writes, generation

        while time.time() < w1:
            handler.num_nodes_waiting()
            if first is None and time.time() >= w0:
                first = snapshot()
            time.sleep(MONITOR_INTERVAL)
        last = snapshot()
        assert first is not None
        ops = {k: last[0][k] - first[0].get(k, 0) for k in last[0]}
        results.put(
            {
                "index": index,
                "ops": ops,
                "doc_writes": last[1] - first[1],
                "generations": (first[2], last[2]),
            }
        )
        formed.wait(timeout=FORMATION_TIMEOUT + seconds)  # stay until everyone has measured
    except BaseException as exc:  # report every failure to the driver, then die
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        code = 1
    finally:
        results.close()
        results.join_thread()
        os._exit(code)


def run(t: Target, seconds: float) -> dict[str, Any]:
    start = CTX.Barrier(t.nodes)
    formed = CTX.Barrier(t.nodes)
    results: multiprocessing.Queue = CTX.Queue()  # type: ignore[type-arg]
    procs = [
        CTX.Process(target=_node, args=(t, i, seconds, start, formed, results), daemon=True) for i in range(t.nodes)
    ]
    for p in procs:
        p.start()
    got = collect_results(procs, results, t.nodes, time.monotonic() + 2 * FORMATION_TIMEOUT + seconds + 30, t.system)
    kinds = sorted({k for r in got for k in r["ops"]})
    total = {k: sum(r["ops"].get(k, 0) for r in got) for k in kinds}
    generations = next((r["generations"] for r in got if r["index"] == 0), (-1, -1))
    return {
        "reads": reads(total) / seconds,
        "writes": writes(total) / seconds,
        "doc_writes": sum(r["doc_writes"] for r in got),
        "by_kind": {k: v / seconds for k, v in total.items()},
        "generations": generations,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the measured window")
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["fsrdzv-dir", "fsrdzv-tmpfs", "fsrdzv-s3", "torch-c10d-tcp"],
        choices=SYSTEMS,
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default="steady_state")
    parser.add_argument("--no-files", action="store_true")
    args = parser.parse_args(argv)

    unavailable: dict[str, str] = {}
    rows: list[list[object]] = []
    verdicts: list[str] = []
    with contextlib.ExitStack() as stack:
        env = _prepare(args.systems, stack, unavailable)
        for system in args.systems:
            if system in unavailable:
                rows.append([system, args.nodes, unavailable[system], "", "", "", ""])
                continue
            r_series, w_series, d_series = Series(), Series(), Series()
            detail: dict[str, Any] = {}
            error = ""
            for _ in range(args.repeat):
                try:
                    detail = run(_target(system, args.nodes, env), args.seconds)
                except RuntimeError as exc:
                    error = str(exc)
                    break
                r_series.add(detail["reads"])
                w_series.add(detail["writes"])
                d_series.add(detail["doc_writes"])
                print(
                    f"{system:16s} N={args.nodes} reads/s {detail['reads']:7.1f}  writes/s {detail['writes']:6.2f}"
                    f"  document writes {detail['doc_writes']}  generation {detail['generations']}"
                    f"  per kind/s { {k: round(v, 2) for k, v in detail['by_kind'].items()} }",
                    flush=True,
                )
            if error and not r_series.values:
                rows.append([system, args.nodes, f"failed: {error[:120]}", "", "", "", ""])
                continue
            gen = detail.get("generations", (-1, -1))
            check = "" if gen[0] < 0 else f"{gen[0]} -> {gen[1]}"
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in detail["by_kind"].items() if v)
            rows.append(
                [
                    system,
                    args.nodes,
                    f"{r_series.median:.1f}",
                    f"{w_series.median:.2f}",
                    f"{d_series.median:.0f}",
                    check,
                    kinds,
                ]
            )
            if system.startswith("fsrdzv"):
                ok = d_series.hi == 0 and (gen[0] < 0 or gen[0] == gen[1])
                verdicts.append(
                    f"- {system}: {d_series.hi:.0f} writes to the shared document in {args.seconds:g} s of stable "
                    f"membership: {'met' if ok else 'MISSED'} (target 0)"
                )
    table = markdown_table(
        [
            "system",
            "N",
            "reads/s (all nodes)",
            "writes/s (all nodes)",
            "writes to the shared document",
            "document generation (start -> end)",
            "operations per second by kind",
        ],
        rows,
    )
    command = "python benchmarks/steady_state.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        f"# Steady state: {args.nodes} nodes, {args.seconds:g} s of stable membership\n\n"
        f"{section('command', '`' + command.strip() + '`')}\n\nMachine: {section('machine', machine_note())}\n\n"
        f"{section('table', table)}\n\n{section('verdicts', chr(10).join(verdicts) or '(no fsrdzv row)')}\n"
    )
    print()
    print(text)
    if not args.no_files:
        write_result(f"{args.out}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
