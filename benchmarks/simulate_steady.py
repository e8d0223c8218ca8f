"""Steady state in the scale simulation: N nodes hold a formed round for minutes on modelled S3, GCS and NFS.

    .venv/bin/python benchmarks/simulate_steady.py                      # 1,024 and 4,096 nodes, 10 minutes
    .venv/bin/python benchmarks/simulate_steady.py --nodes 256 --seconds 120 --models nfs   # a quick look

Every node runs fsrdzv's real handler in virtual time (see ``simulate.py``), forms the round, then calls
``num_nodes_waiting()`` every ``--monitor`` seconds (torchrun's ``--monitor-interval``, 0.1 s by default; the calls
between two refreshes cost nothing) while its keep-alive runs, for ``--seconds`` of virtual time. Reported per
node-hour: requests (by kind) and response-body bytes as the model's service would send them (a conditional read
answered 304 sends none; S3 listings are XML), and the hottest object's requests per second over the window,
against the model's limits.
"one dies" rows: the last node stops, as a hung host does (no error anywhere, its heartbeats stop), as the window
starts (min_nodes = N - 1); the survivors re-rendezvous once ``num_nodes_waiting()`` says so, and the window
includes that recovery: the table gives the virtual seconds from the death to the first agent told, and to the last
survivor holding its rank in the new round.

Results go to benchmarks/results/simulation_steady.md (table) and simulation_steady.png (plot); ``--raw FILE``
appends every cell as a JSON line, ``--merge FILE`` reports saved cells (long runs can be split).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, machine_note, markdown_table, section, write_result  # noqa: E402
from simulate import run_on_one_cpu, simulate  # noqa: E402

from fsrdzv.testing._sim import PRESETS  # noqa: E402

#: Requests per second one object (or prefix) of the model takes: S3's per-prefix GET rate, GCS's initial
#: per-bucket read rate; NFS has no such limit.
LIMITS = {"s3-throttled": 5500.0, "gcs-throttled": 5000.0, "nfs": math.inf}


def cell(model: str, nodes: int, seconds: float, kill: bool, monitor: float = 0.1) -> dict[str, Any]:
    started = time.monotonic()
    r = simulate(
        PRESETS[model],
        "fsrdzv",
        nodes,
        steady=seconds,
        kill=kill,
        monitor=monitor,
        real_limit=7200.0,
        time_limit=1200.0,
    )
    out: dict[str, Any] = {
        "model": model,
        "nodes": nodes,
        "seconds": seconds,
        "kill": kill,
        "formed": r.formed,
        "note": r.note,
        "errors": r.errors,
        "real_seconds": time.monotonic() - started,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "document_bytes": r.document_bytes,
        "monitor": monitor,
        "detected": None if math.isnan(r.detected) else r.detected,
        "reformed": None if math.isnan(r.reformed) else r.reformed,
        "document_peak": None if math.isnan(r.doc_peak) else r.doc_peak,
    }
    if r.steady is not None:
        s = r.steady
        hours = nodes * seconds / 3600
        requests = sum(v for k, v in s.ops.items() if k not in ("unchanged", "list_pages"))
        hottest, count = s.by_object.most_common(1)[0] if s.by_object else ("-", 0)
        out.update(
            requests_per_node_hour=requests / hours,
            ops_per_node_hour={k: v / hours for k, v in s.ops.items()},
            bytes_per_node_hour=s.body_bytes / hours,
            hottest=hottest,
            hottest_per_second=count / seconds,
            document_writes=s.cas_won,
            throttled=s.prefix_throttled + s.object_throttled,
        )
    return out


def _recovery(c: dict[str, Any]) -> str:
    if not c["kill"]:
        return "-"
    detected, reformed = c.get("detected"), c.get("reformed")
    return " / ".join("-" if v is None else f"{v:.1f}" for v in (detected, reformed))


def _extra(c: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    """What the death cost each node beyond the same window without one (requests, response bytes): unlike the
    rates, it does not depend on the window's length."""
    calm = [
        o
        for o in cells
        if not o["kill"] and (o["model"], o["nodes"]) == (c["model"], c["nodes"]) and "requests_per_node_hour" in o
    ]
    if not c["kill"] or not calm:
        return "-"
    hours = c["seconds"] / 3600
    requests = (c["requests_per_node_hour"] - calm[0]["requests_per_node_hour"]) * hours
    body = (c["bytes_per_node_hour"] - calm[0]["bytes_per_node_hour"]) * hours
    return f"{requests:,.0f} / {body / 1e3:,.0f} KB"


def report(cells: list[dict[str, Any]]) -> str:
    rows = []
    for c in sorted(cells, key=lambda c: (c["model"], c["nodes"], c["kill"])):
        if "requests_per_node_hour" not in c:
            rows.append([c["model"], c["nodes"], "dies" if c["kill"] else "-", f"failed: {c['note']} {c['errors']}"])
            continue
        ops = c["ops_per_node_hour"]
        limit = LIMITS.get(c["model"], math.inf)
        rows.append(
            [
                c["model"],
                f"{c['nodes']:,}",
                "one dies" if c["kill"] else "-",
                f"{c['seconds']:g} s",
                f"{c['requests_per_node_hour']:,.0f}",
                f"{ops.get('read', 0):,.0f} ({ops.get('unchanged', 0):,.0f} unchanged)",
                f"{ops.get('put', 0):,.0f}",
                f"{ops.get('get', 0):,.0f}",
                f"{ops.get('tag', 0):,.0f}",
                f"{ops.get('list', 0):,.0f}",
                f"{c['bytes_per_node_hour'] / 1e3:,.0f} KB",
                f"{c['hottest_per_second']:,.1f} ({c['hottest'].split('/')[0]})",
                "-" if c.get("document_peak") is None else f"{c['document_peak']:,.0f}",
                f"{c['nodes'] / 4:,.0f}",
                "none" if math.isinf(limit) else f"{limit:,.0f}",
                c["throttled"],
                _recovery(c),
                _extra(c, cells),
                f"{c['real_seconds']:.0f} s",
            ]
        )
    headers = [
        "model",
        "N",
        "death",
        "window, virtual",
        "requests / node-h",
        "document reads / node-h",
        "record PUTs",
        "record GETs",
        "record tag reads (HEAD)",
        "LISTs",
        "response bodies / node-h",
        "hottest object req/s (window mean)",
        "document req/s, busiest second",
        "bound N/4",
        "model's limit req/s",
        "throttled",
        "death noticed / re-formed, virtual s",
        "the death's extra requests / bytes per node",
        "real time",
    ]
    return markdown_table(headers, rows)


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    done = [c for c in cells if "bytes_per_node_hour" in c]
    for model in sorted({c["model"] for c in done}):
        calm = sorted((c for c in done if c["model"] == model and not c["kill"]), key=lambda c: c["nodes"])
        dies = sorted((c for c in done if c["model"] == model and c["kill"]), key=lambda c: c["nodes"])
        if calm:
            ns = [c["nodes"] for c in calm]
            left.plot(ns, [c["bytes_per_node_hour"] / 1e3 for c in calm], marker="o", label=model)
            line = right.plot(ns, [c["hottest_per_second"] for c in calm], marker="o", label=f"{model}: mean")[0]
            peaks = [(c["nodes"], c["document_peak"]) for c in calm if c.get("document_peak") is not None]
            if peaks:
                right.plot(
                    *zip(*peaks, strict=True),
                    marker="^",
                    linestyle=":",
                    color=line.get_color(),
                    label=f"{model}: busiest s",
                )
        peaks = [(c["nodes"], c["document_peak"]) for c in dies if c.get("document_peak") is not None]
        if peaks:
            right.plot(
                *zip(*peaks, strict=True),
                marker="x",
                linestyle="none",
                markersize=9,
                label=f"{model}, one dies: busiest s",
            )
    ns = sorted({c["nodes"] for c in done})
    right.plot(ns, [n / 4 for n in ns], linestyle="--", color="grey", label="N/4")
    left.axhline(100, linestyle="--", color="grey", label="100 KB target")
    left.set_yscale("symlog", linthresh=10)
    top = max([c["bytes_per_node_hour"] / 1e3 for c in done if not c["kill"]] + [100.0])
    left.set_ylim(bottom=0, top=top * 3)
    left.set(
        xscale="log",
        xlabel="nodes",
        ylabel="KB of response bodies per node-hour",
        title="Bytes per node, stable membership (0: none at all)",
    )
    right.set(xscale="log", yscale="log", xlabel="nodes", ylabel="requests/s", title="The document (hottest object)")
    for ax in (left, right):
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--models", nargs="+", default=["s3-throttled", "gcs-throttled", "nfs"])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--deaths", nargs="+", choices=["none", "one"], default=["none", "one"])
    parser.add_argument("--monitor", type=float, default=0.1, help="seconds between num_nodes_waiting() calls")
    parser.add_argument("--raw", help="append every cell to this file as a JSON line")
    parser.add_argument("--merge", nargs="+", help="report the cells saved in these files (no simulation)")
    parser.add_argument("--out", default="simulation_steady")
    parser.add_argument("--no-files", action="store_true")
    args = parser.parse_args()
    cells: list[dict[str, Any]] = []
    run_on_one_cpu()
    if args.merge:
        for name in args.merge:
            cells += [json.loads(line) for line in Path(name).read_text().splitlines() if line.strip()]
        # A later cell of the same model, size and death replaces an earlier one (a re-run).
        cells = list({(c["model"], c["nodes"], c["kill"]): c for c in cells}.values())
    else:
        for n in args.nodes:
            for model in args.models:
                for death in args.deaths:
                    got = cell(model, n, args.seconds, death == "one", args.monitor)
                    got["command"] = "python benchmarks/simulate_steady.py " + " ".join(sys.argv[1:])
                    cells.append(got)
                    print(json.dumps(got), flush=True)
                    if args.raw:
                        with open(args.raw, "a") as f:
                            f.write(json.dumps(got) + "\n")
    commands = list(dict.fromkeys(c["command"] for c in cells if c.get("command")))
    text = (
        "# Steady state in the simulation: a window of virtual time after formation\n\n"
        f"{section('command', chr(10).join(f'- `{c}`' for c in commands) or '-')}\n\n"
        f"{section('table', report(cells))}\n\nMachine (real time only): {section('machine', machine_note())}\n"
    )
    print(text)
    if not args.no_files:
        write_result(f"{args.out}.md", text)
        plot(cells, RESULTS / f"{args.out}.png")
        print(f"wrote {RESULTS / args.out}.md and .png")


if __name__ == "__main__":
    main()
