"""Steady state through a counting HTTP proxy: what N nodes holding a formed round cost an object store.

    .venv/bin/python benchmarks/steady_proxy.py                       # 16 nodes, 120 s, fsrdzv now vs before
    .venv/bin/python benchmarks/steady_proxy.py --seconds 30 --quick  # shorter, no per-store probe table

N processes (torch's defaults: keep-alive every 5 s; min = max = N) form a round on S3 (moto) through a counting
reverse proxy, then behave like torchrun's agent while its workers run: ``num_nodes_waiting()`` every 0.1 s. After
a settling pause the proxy counts every request for ``--seconds``: requests and response bytes (bodies; headers
apart) per node-hour, by kind, and the hottest object's requests per second (the issue's bound: N/4).

``--before REV`` runs the same nodes on the fsrdzv of another git revision (extracted with ``git archive`` into a
temporary directory; default: the commit before the conditional reads), in the same run, interleaved.

A second table measures, per store (moto, Azurite, fake-gcs-server, each behind the proxy), what one way of
asking "did anything change?" costs: a full read of a 16-node document, a conditional read of it (304), a listing
of an empty request prefix, a listing of 16 heartbeats, and a read of a tiny pointer object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from _common import machine_note, markdown_table, section, write_result  # noqa: E402
from _proxy import CountingProxy, Tally  # noqa: E402

from tests.servers import Server, start_server  # noqa: E402

SETTLE = 3.0
MONITOR_INTERVAL = 0.1
#: The commit before the conditional reads (issue 16 item 1): "before" in the same run.
DEFAULT_BEFORE = "41d6209"

_NODE = textwrap.dedent(
    """
    import json, sys, threading, time
    import fsrdzv
    url, run_id, n, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    options = json.loads(sys.argv[5])
    h = fsrdzv.create_handler(url, run_id, n, n, storage_options=options, local_addr=f"10.9.0.{index + 1}")
    peer_period = float(sys.argv[6])
    if peer_period >= 0 and hasattr(h, "_peers"):
        h._peers.period = peer_period if peer_period > 0 else float("inf")  # an experiment, not fsrdzv as shipped
    h.next_rendezvous()
    print("formed", flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    while not stop.is_set():
        h.num_nodes_waiting()
        time.sleep(INTERVAL)
    h.shutdown()
    print("done", flush=True)
    """
).replace("INTERVAL", repr(MONITOR_INTERVAL))


def _proxied_options(server: Server, kind: str, proxy_url: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    url, options, env = server.endpoint()
    options = dict(options)
    if kind == "s3":
        options["endpoint_url"] = proxy_url
    elif kind == "gcs":
        options["endpoint_url"] = proxy_url
        env = {k: v for k, v in env.items() if k != "STORAGE_EMULATOR_HOST"}
    else:
        parts = [p for p in options["connection_string"].split(";") if p and not p.startswith("BlobEndpoint=")]
        account = next(p.split("=", 1)[1] for p in parts if p.startswith("AccountName="))
        options["connection_string"] = ";".join([*parts, f"BlobEndpoint={proxy_url}/{account}"])
    return url, options, env


def _tree(rev: str) -> Path:
    """The fsrdzv package of git revision ``rev``, extracted into a temporary directory."""
    target = Path(tempfile.mkdtemp(prefix=f"fsrdzv-{rev}-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "fsrdzv"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def _steady(
    nodes: int, seconds: float, tree: Path, server: Server, proxy: CountingProxy, peer_period: float = -1.0
) -> tuple[Tally, float]:
    url, options, env = _proxied_options(server, "s3", proxy.url)
    options = {**options, "skip_selftest": True}
    run_id = f"steady-{uuid.uuid4().hex[:8]}"
    child_env = {**os.environ, **env, "PYTHONPATH": str(tree)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NODE, url, run_id, str(nodes), str(i), json.dumps(options), str(peer_period)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env,
            text=True,
        )
        for i in range(nodes)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "formed":
                raise RuntimeError(f"a node did not form (exit {p.poll()}): {line!r}")
        time.sleep(SETTLE)
        started = proxy.start_counting()
        time.sleep(seconds)
        tally = proxy.stop_counting()
        window = time.monotonic() - started
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.write("stop\n")
                p.stdin.flush()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    return tally, window


def _row(label: str, tally: Tally, nodes: int, window: float) -> list[object]:
    hours = nodes * window / 3600
    gets = sum(v for (m, _), v in tally.by_kind.items() if m == "GET")
    unchanged = tally.by_kind.get(("GET", 304), 0)
    puts = sum(v for (m, _), v in tally.by_kind.items() if m == "PUT")
    hottest_key, hottest = tally.by_object.most_common(1)[0] if tally.by_object else ("-", 0)
    return [
        label,
        f"{tally.requests / hours:,.0f}",
        f"{gets / hours:,.0f} ({unchanged / hours:,.0f} x 304)",
        f"{puts / hours:,.0f}",
        f"{tally.body_bytes / hours / 1e6:,.3f} MB",
        f"{tally.header_bytes / hours / 1e6:,.2f} MB",
        f"{hottest / window:.2f} ({hottest_key.rsplit('/', 1)[-1]})",
        f"{nodes / 4:.1f}",
        f"${(gets * 0.4 + (tally.requests - gets) * 5.0) / hours / 1e6:.4f}",
    ]


def _probe_costs(kinds: list[str], repeat: int = 20) -> list[list[object]]:
    """Bytes and requests of each way of asking whether the document changed, per store."""
    rows: list[list[object]] = []
    for kind in kinds:
        server = start_server(kind)
        try:
            with CountingProxy(_upstream(server, kind)) as proxy:
                rows.extend(_probe_one(kind, server, proxy, repeat))
        finally:
            server.stop()
    return rows


def _probe_one(kind: str, server: Server, proxy: CountingProxy, repeat: int) -> list[list[object]]:
    import fsrdzv

    url, options, env = _proxied_options(server, kind, proxy.url)
    os.environ.update(env)
    store: Any = fsrdzv.open_store(url, f"probe-{uuid.uuid4().hex[:6]}", storage_options=options)
    document = (b'{"m":"ip-172-31-20-117.eu-west-1.compute.internal:29500"}' * 90)[:5200]
    snap = store.compare_and_set(document, None).snapshot
    for i in range(16):
        store.put_record("hb", f"node-{i}", b'{"n":1}')
    store.put_record("ptr", "doc", b'{"generation":1,"waiting":0}')
    ways = {
        "full GET of the document (5.2 KB)": lambda: store.read(),
        "conditional GET (unchanged)": lambda: store.read_if_changed(snap.token),
        "LIST of the empty request prefix": lambda: store.list_records("req"),
        "LIST of 16 heartbeats": lambda: store.list_records("hb"),
        "GET of a 28-byte pointer object": lambda: store.read_record("ptr", "doc"),
    }
    rows: list[list[object]] = []
    for label, fn in ways.items():
        fn()
        proxy.start_counting()
        for _ in range(repeat):
            fn()
        t = proxy.stop_counting()
        answers = ", ".join(f"{m} {s}" for (m, s) in sorted(t.by_kind))
        rows.append(
            [
                kind,
                label,
                f"{t.requests / repeat:g}",
                f"{t.body_bytes / repeat:,.0f}",
                f"{t.header_bytes / repeat:,.0f}",
                answers,
            ]
        )
    store.delete_run()
    return rows


def _upstream(server: Server, kind: str) -> str:
    _, options, env = server.endpoint()
    if kind == "s3":
        return str(options["endpoint_url"])
    if kind == "gcs":
        return str(options.get("endpoint_url") or env["STORAGE_EMULATOR_HOST"])
    blob = next(p for p in options["connection_string"].split(";") if p.startswith("BlobEndpoint="))
    return blob.split("=", 1)[1].rsplit("/", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision to compare with ('' for none)")
    parser.add_argument("--quick", action="store_true", help="skip the per-store probe table")
    parser.add_argument(
        "--peer-period",
        type=float,
        nargs="*",
        default=[],
        help="extra rows with the handler's peer watch (num_nodes_waiting's ring of heartbeat reads) every S "
        "seconds instead (0: off): an experiment, to attribute the costs",
    )
    parser.add_argument("--out", default="steady_proxy.md")
    parser.add_argument("--no-files", action="store_true")
    args = parser.parse_args()

    trees: list[tuple[str, Path, float]] = [("fsrdzv (this tree)", REPO, -1.0)]
    for period in args.peer_period:
        what = "off" if period == 0 else f"every {period:g} s"
        trees.append((f"fsrdzv (this tree), peer watch {what} (experiment)", REPO, period))
    if args.before:
        trees.append((f"fsrdzv {args.before} (before)", _tree(args.before), -1.0))
    server = start_server("s3")
    rows = []
    try:
        with CountingProxy(_upstream(server, "s3")) as proxy:
            for label, tree, period in trees:
                tally, window = _steady(args.nodes, args.seconds, tree, server, proxy, period)
                rows.append(_row(label, tally, args.nodes, window))
                print(label, json.dumps({"requests": tally.requests, "body": tally.body_bytes, "window": window}))
    finally:
        server.stop()
    headers = [
        "system",
        "requests / node-h",
        "GETs / node-h",
        "PUTs / node-h",
        "response bodies / node-h",
        "response headers / node-h",
        "hottest object req/s",
        "bound N/4",
        "$ / node-h (S3: GET $0.4/M, PUT/LIST $5/M)",
    ]
    text = section(
        f"Steady state on S3 (moto) through a counting proxy: {args.nodes} nodes, {args.seconds:g} s",
        markdown_table(headers, rows),
    )
    if not args.quick:
        probe_headers = ["store", "way to ask", "requests", "body bytes", "header bytes", "answers"]
        text += section(
            "What one 'did it change?' costs per store (through the proxy, mean of 20)",
            markdown_table(probe_headers, _probe_costs(["s3", "azure", "gcs"])),
        )
    text += machine_note()
    print(text)
    if not args.no_files:
        print(f"wrote {write_result(args.out, text)}")


if __name__ == "__main__":
    main()
