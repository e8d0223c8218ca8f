"""Steady state through a counting HTTP proxy: what N nodes holding a formed round cost an object store.

    .venv/bin/python benchmarks/steady_proxy.py                       # 16 nodes, 120 s, fsrdzv now vs before
    .venv/bin/python benchmarks/steady_proxy.py --seconds 30 --quick  # shorter, no per-store probe table

N processes (torch's defaults: keep-alive every 5 s; min = max = N) form a round on S3 (moto) through a counting
reverse proxy, then behave like torchrun's agent while its workers run: ``num_nodes_waiting()`` every 0.1 s. After
a settling pause the proxy counts every request for ``--seconds``: requests and response bytes (bodies; headers
apart) per node-hour, by kind, and the hottest object's requests per second (the issue's bound: N/4).

``--before REV ...`` runs the same nodes on the fsrdzv of other git revisions (extracted with ``git archive`` into
a temporary directory; default: the tree whose peer watch read two records' bodies every second, and the commit
before the conditional reads), in the same run. ``--secret`` adds a row with a job secret (signed records: the peer
watch reads and verifies its peers' heartbeats instead of asking their tags).

``--directory`` measures the directory store instead (tmpfs, no proxy): ``strace -f -c`` attached to every node
during the window counts the file and descriptor syscalls per node per second, and how many of them failed.

A second table measures, per store (moto, Azurite, fake-gcs-server, each behind the proxy), what one way of
asking "did anything change?" costs: a full read of a 16-node document, a conditional read of it (304), a listing
of an empty request prefix, a listing of 16 heartbeats, and a read of a tiny pointer object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
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
#: "Before" in the same run: the peer watch with full GETs every second (issue 15's PeerWatch before
#: Store.record_tag), and the commit before the conditional reads (issue 16 item 1).
DEFAULT_BEFORE = ["a3a5361", "41d6209"]
SECRET = "0123456789abcdef0123456789abcdef"

_NODE = textwrap.dedent(
    """
    import json, sys, threading, time
    import fsrdzv
    url, run_id, n, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    options = json.loads(sys.argv[5])
    secret = {"secret": sys.argv[7].encode()} if sys.argv[7] else {}
    h = fsrdzv.create_handler(url, run_id, n, n, storage_options=options, local_addr=f"10.9.0.{index + 1}", **secret)
    peer_period = float(sys.argv[6])
    if peer_period >= 0 and hasattr(h, "_peers"):
        h._peers.interval = peer_period if peer_period > 0 else float("inf")  # an experiment, not fsrdzv as shipped
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


@dataclass(frozen=True)
class Variant:
    """One row: a tree of fsrdzv, the peer watch's period (-1: as shipped; 0: off) and a job secret."""

    label: str
    tree: Path
    peer_period: float = -1.0
    secret: str = ""


@contextlib.contextmanager
def _nodes(nodes: int, url: str, options: dict[str, Any], env: dict[str, str], variant: Variant) -> Iterator[list[int]]:
    """N node processes that formed a round and keep calling num_nodes_waiting (their pids) until the block ends."""
    run_id = f"steady-{uuid.uuid4().hex[:8]}"
    child_env = {**os.environ, **env, "PYTHONPATH": str(variant.tree)}
    argv = [json.dumps(options), str(variant.peer_period), variant.secret]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NODE, url, run_id, str(nodes), str(i), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env,
            # ``python -c`` puts the working directory first on sys.path: run in the tree, or this checkout's
            # fsrdzv would shadow an older revision's.
            cwd=variant.tree,
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
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.write("stop\n")
                    p.stdin.flush()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def _steady(nodes: int, seconds: float, server: Server, proxy: CountingProxy, variant: Variant) -> tuple[Tally, float]:
    url, options, env = _proxied_options(server, "s3", proxy.url)
    with _nodes(nodes, url, {**options, "skip_selftest": True}, env, variant):
        started = proxy.start_counting()
        time.sleep(seconds)
        tally = proxy.stop_counting()
        window = time.monotonic() - started
    return tally, window


def _directory_syscalls(nodes: int, seconds: float, variant: Variant) -> list[object]:
    """File and descriptor syscalls of N nodes on a tmpfs directory during the window, per node per second."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    root = tempfile.mkdtemp(prefix="fsrdzv-steady-", dir=base)
    summary = Path(root + ".strace")
    try:
        with _nodes(nodes, root, {}, {}, variant) as pids:
            attach = [a for pid in pids for a in ("-p", str(pid))]
            tracer = subprocess.Popen(
                ["strace", "-f", "-c", "-q", "-e", "trace=%file,%desc", "-o", str(summary), *attach],
                stderr=subprocess.DEVNULL,
            )
            time.sleep(seconds)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    calls = _strace_counts(summary.read_text())
    summary.unlink()
    per = nodes * seconds
    total = sum(c for c, _ in calls.values())
    failed = sum(e for _, e in calls.values())
    top = ", ".join(f"{name} {c / per:.2f}" for name, (c, _) in sorted(calls.items(), key=lambda kv: -kv[1][0])[:6])
    errors = ", ".join(f"{name} {e / per:.2f}" for name, (_, e) in calls.items() if e) or "none"
    return [variant.label, f"{total / per:.2f}", f"{failed / per:.2f}", top, errors]


def _strace_counts(text: str) -> dict[str, tuple[int, int]]:
    """``{syscall: (calls, errors)}`` from an ``strace -c`` summary."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0][0].isdigit() or parts[-1] == "total":
            continue
        name = parts[-1]
        numbers = parts[3:-1]  # calls, then errors if any
        out[name] = (int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 0)
    return out


def _row(label: str, tally: Tally, nodes: int, window: float) -> list[object]:
    hours = nodes * window / 3600
    gets = sum(v for (m, _), v in tally.by_kind.items() if m == "GET")
    heads = sum(v for (m, _), v in tally.by_kind.items() if m == "HEAD")
    unchanged = tally.by_kind.get(("GET", 304), 0)
    puts = sum(v for (m, _), v in tally.by_kind.items() if m == "PUT")
    hottest_key, hottest = tally.by_object.most_common(1)[0] if tally.by_object else ("-", 0)
    # S3 list prices: GET and HEAD $0.4 per million, PUT and LIST $5 (moto's LIST is a GET: rare in steady state).
    cheap = gets + heads
    return [
        label,
        f"{tally.requests / hours:,.0f}",
        f"{gets / hours:,.0f} ({unchanged / hours:,.0f} x 304)",
        f"{heads / hours:,.0f}",
        f"{puts / hours:,.0f}",
        f"{tally.body_bytes / hours / 1e3:,.1f} KB",
        f"{tally.header_bytes / hours / 1e6:,.2f} MB",
        f"{hottest / window:.2f} ({hottest_key.rsplit('/', 1)[-1]})",
        f"{nodes / 4:.1f}",
        f"${(cheap * 0.4 + (tally.requests - cheap) * 5.0) / hours / 1e6:.4f}",
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
    heartbeat = b'{"n":1,"a":["ip-172-31-20-117.eu-west-1.compute.internal"]}'
    store.put_record("beat", "node-0", heartbeat)
    ways = {
        "full GET of the document (5.2 KB)": lambda: store.read(),
        "conditional GET (unchanged)": lambda: store.read_if_changed(snap.token),
        "LIST of the empty request prefix": lambda: store.list_records("req"),
        "LIST of 16 heartbeats": lambda: store.list_records("hb"),
        "GET of a 28-byte pointer object": lambda: store.read_record("ptr", "doc"),
        f"GET of a {len(heartbeat)}-byte heartbeat record": lambda: store.read_record("beat", "node-0"),
        "tag of that heartbeat (Store.record_tag)": lambda: store.record_tag("beat", "node-0"),
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
    parser.add_argument(
        "--before", nargs="*", default=DEFAULT_BEFORE, help="git revisions to compare with (none: only this tree)"
    )
    parser.add_argument("--secret", action="store_true", help="add a row with a job secret (signed records)")
    parser.add_argument("--directory", action="store_true", help="count a tmpfs directory's syscalls instead")
    parser.add_argument("--quick", action="store_true", help="skip the per-store probe table")
    parser.add_argument(
        "--peer-period",
        type=float,
        nargs="*",
        default=[],
        help="extra rows with the handler's peer watch (num_nodes_waiting's ring of heartbeat reads) every S "
        "seconds instead (0: off): an experiment, to attribute the costs",
    )
    parser.add_argument("--out", default=None, help="result file (default steady_proxy.md, or steady_directory.md)")
    parser.add_argument("--no-files", action="store_true")
    args = parser.parse_args()

    variants = [Variant("fsrdzv (this tree)", REPO)]
    if args.secret:
        variants.append(Variant("fsrdzv (this tree), job secret (signed records)", REPO, secret=SECRET))
    for period in args.peer_period:
        what = "off" if period == 0 else f"every {period:g} s"
        variants.append(Variant(f"fsrdzv (this tree), peer watch {what} (experiment)", REPO, period))
    variants += [Variant(f"fsrdzv {rev} (before)", _tree(rev)) for rev in args.before]
    text = _directory_table(args, variants) if args.directory else _proxy_tables(args, variants)
    text += machine_note()
    print(text)
    if not args.no_files:
        out = args.out or ("steady_directory.md" if args.directory else "steady_proxy.md")
        print(f"wrote {write_result(out, text)}")


def _directory_table(args: argparse.Namespace, variants: list[Variant]) -> str:
    rows = [_directory_syscalls(args.nodes, args.seconds, v) for v in variants]
    headers = ["system", "syscalls / node / s", "failed / node / s", "most frequent (per node / s)", "failures"]
    name = f"Steady state on a tmpfs directory, strace -f -c: {args.nodes} nodes, {args.seconds:g} s"
    return section(name, markdown_table(headers, rows))


def _proxy_tables(args: argparse.Namespace, variants: list[Variant]) -> str:
    server = start_server("s3")
    rows = []
    try:
        with CountingProxy(_upstream(server, "s3")) as proxy:
            for variant in variants:
                tally, window = _steady(args.nodes, args.seconds, server, proxy, variant)
                rows.append(_row(variant.label, tally, args.nodes, window))
                counts = {"requests": tally.requests, "body": tally.body_bytes, "window": window}
                print(variant.label, json.dumps(counts), dict(tally.by_kind), flush=True)
    finally:
        server.stop()
    headers = [
        "system",
        "requests / node-h",
        "GETs / node-h",
        "HEADs / node-h",
        "PUTs / node-h",
        "response bodies / node-h",
        "response headers / node-h",
        "hottest object req/s",
        "bound N/4",
        "$ / node-h (S3: GET, HEAD $0.4/M, PUT/LIST $5/M)",
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
    return text


if __name__ == "__main__":
    main()
