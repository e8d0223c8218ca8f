"""Shared helpers of the benchmarks: a counting store wrapper, statistics, tables, plots and test servers.

Nothing here is part of fsrdzv's API; the benchmarks import it as a sibling module.
"""

from __future__ import annotations

import contextlib
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fsrdzv._store import NOT_MODIFIED, CasResult, NotModified, Snapshot, Store  # noqa: E402
from fsrdzv._storewrap import StoreWrapper  # noqa: E402

#: Kinds of raw storage operation that read, and that write.
READ_KINDS = ("read", "get", "list")
WRITE_KINDS = ("cas", "put", "delete")


class CountingStore(StoreWrapper):
    """Wrap ``inner`` and count every storage operation by kind.

    It counts what really reaches the storage, including the read a store makes after a lost compare-and-set,
    and keeps the wall-clock time of every read-type operation (for the per-node read rate).
    """

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.ops: dict[str, int] = {
            "read": 0,
            "unchanged": 0,
            "cas": 0,
            "cas_lost": 0,
            "put": 0,
            "get": 0,
            "list": 0,
            "delete": 0,
        }
        self.read_times: list[float] = []
        self.doc_read_times: list[float] = []
        #: Wall-clock times at which this node's compare-and-sets of the document took effect.
        self.write_times: list[float] = []
        self.doc_writes = 0
        #: With ``timeline()``: (start, end, operation) of every storage operation, wall-clock seconds.
        self.events: list[tuple[float, float, str]] | None = None
        self._lock = threading.Lock()

    def timeline(self) -> None:
        """Also record when every operation started and ended (``events``), for a timeline of a formation."""
        self.events = []

    def _event(self, started: float, what: str) -> None:
        if self.events is not None:
            with self._lock:
                self.events.append((started, time.time(), what))

    @contextlib.contextmanager
    def _timed(self, what: str) -> Iterator[None]:
        started = time.time()
        try:
            yield
        finally:
            self._event(started, what)

    def _count(self, kind: str) -> None:
        with self._lock:
            self.ops[kind] += 1
            if kind in READ_KINDS:
                self.read_times.append(time.time())
            if kind == "read":
                self.doc_read_times.append(time.time())

    def read(self) -> Snapshot | None:
        self._count("read")
        with self._timed("read"):
            return self.inner.read()

    def read_if_changed(self, token: object) -> Snapshot | NotModified | None:
        self._count("read")
        with self._timed("read"):
            got = self.inner.read_if_changed(token)
        if got is NOT_MODIFIED:
            self._count("unchanged")
        return got

    def compare_and_set(self, data: bytes, token: object = None) -> CasResult:
        self._count("cas")
        started = time.time()
        result = self.inner.compare_and_set(data, token)
        self._event(started, "cas" if result.won else "cas lost")
        if result.won:
            with self._lock:
                self.doc_writes += 1
                self.write_times.append(time.time())
        else:
            # The inner store read the current document to answer the lost compare-and-set.
            self._count("cas_lost")
            self._count("read")
        return result

    def put_record(self, kind: str, name: str, data: bytes) -> None:
        self._count("put")
        with self._timed(f"put {kind}"):
            self.inner.put_record(kind, name, data)

    def read_record(self, kind: str, name: str) -> bytes | None:
        self._count("get")
        with self._timed(f"get {kind}"):
            return self.inner.read_record(kind, name)

    def list_records(self, kind: str) -> dict[str, str]:
        self._count("list")
        with self._timed(f"list {kind}"):
            return self.inner.list_records(kind)

    def delete_record(self, kind: str, name: str) -> None:
        self._count("delete")
        with self._timed(f"delete {kind}"):
            self.inner.delete_record(kind, name)


def reads(ops: dict[str, int]) -> int:
    return sum(ops.get(k, 0) for k in READ_KINDS)


def writes(ops: dict[str, int]) -> int:
    return sum(ops.get(k, 0) for k in WRITE_KINDS)


def max_rate(times: Sequence[float], start: float, end: float, window: float = 1.0) -> float:
    """Largest number of events within any ``window`` seconds of ``[start, end]``, per second.

    A node that waits less than a window is judged over the window anyway (events / window), so a last arrival
    that reads twice in 10 ms counts 2/s, not 200/s.
    """
    inside = sorted(t for t in times if start - 1e-6 <= t <= end + 1e-6)
    best = 0
    j = 0
    for i, t in enumerate(inside):
        while inside[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best / window


# -- statistics and tables -------------------------------------------------------------------------------------


@dataclass
class Series:
    """Values of one measurement over repetitions."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else float("nan")

    def fmt(self, unit: str = "s", digits: int = 3) -> str:
        if not self.values:
            return "—"
        if unit == "s":
            return f"{self.median:.{digits}f} ({self.lo:.{digits}f}-{self.hi:.{digits}f})"
        return f"{self.median:.0f} ({self.lo:.0f}-{self.hi:.0f})"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def machine_note() -> str:
    """One line describing the machine and its load (timings on a shared 2-vCPU VM are noisy)."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    load = "n/a"
    with contextlib.suppress(OSError):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is in the dev environment
        torch_version = "not installed"
    return (
        f"{os.cpu_count()} vCPU ({cpu}){mem}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch_version}; load average at the end {load}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def section(name: str, body: str) -> str:
    """Wrap ``body`` in snippet-section markers, so that docs/performance.md can include just this part
    (``--8<-- "benchmarks/results/<file>.md:<name>"``); the markers are HTML comments, invisible elsewhere."""
    return f"<!-- --8<-- [start:{name}] -->\n{body.strip()}\n<!-- --8<-- [end:{name}] -->"


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path


def plot_against_n(
    path: Path,
    title: str,
    ylabel: str,
    series: dict[str, dict[int, Series]],
    *,
    logy: bool = True,
    logx: bool = True,
    reference: tuple[str, dict[int, float]] | None = None,
    styles: dict[str, dict[str, Any]] | None = None,
) -> None:
    """One line per system: median against N with min/max error bars. Writes a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.4), dpi=110)
    for label, by_n in series.items():
        ns = sorted(n for n, s in by_n.items() if s.values)
        if not ns:
            continue
        med = [by_n[n].median for n in ns]
        lo = [by_n[n].median - by_n[n].lo for n in ns]
        hi = [by_n[n].hi - by_n[n].median for n in ns]
        style = {"marker": "o", "capsize": 3, **(styles or {}).get(label, {})}
        ax.errorbar(ns, med, yerr=[lo, hi], label=label, **style)
    if reference is not None:
        label, points = reference
        ns = sorted(points)
        ax.plot(ns, [points[n] for n in ns], linestyle="--", color="grey", label=label)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    all_ns = sorted({n for by_n in series.values() for n in by_n})
    ax.set_xticks(all_ns)
    ax.set_xticklabels([str(n) for n in all_ns])
    ax.set_xlabel("nodes (N)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# -- servers ----------------------------------------------------------------------------------------------------


def collect_results(
    procs: Sequence[Any], results: Any, count: int, deadline: float, label: str
) -> list[dict[str, Any]]:
    """Gather one result dict per node process from ``results`` (a multiprocessing queue), then reap the processes.

    A node that reports ``{"error": ...}`` or a missing report by ``deadline`` (monotonic) raises RuntimeError;
    processes still alive afterwards are killed, so a failed run leaves nothing behind.
    """
    got: list[dict[str, Any]] = []
    try:
        while len(got) < count:
            try:
                item = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{label}: only {len(got)} of {count} nodes reported") from None
            if "error" in item:
                raise RuntimeError(f"{label}: node {item['index']} failed: {item['error']}")
            got.append(item)
    finally:
        for p in procs:
            p.join(timeout=30)
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)
        results.close()
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, timeout: float = 30.0) -> bool:
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.05)
    return False


class ServerUnavailable(RuntimeError):
    pass


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) process ``pid`` has used so far (Linux; 10 ms resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The process id of the running moto server (``moto_server``), whose CPU a benchmark may count.
SERVER_PIDS: dict[str, int] = {}


@contextlib.contextmanager
def moto_server(latency_ms: float = 0.0) -> Iterator[tuple[str, dict[str, Any]]]:
    """A moto S3 server on 127.0.0.1 with a fresh bucket: yields ``(endpoint, storage_options)``; its process id is
    ``SERVER_PIDS["moto"]`` meanwhile. With ``latency_ms`` every request is answered that much later
    (``_moto_latency.py``)."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        raise ServerUnavailable("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    command = [exe, "-H", "127.0.0.1", "-p", str(port)]
    if latency_ms:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_moto_latency.py")
        command = [sys.executable, script, "127.0.0.1", str(port), str(latency_ms)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    SERVER_PIDS["moto"] = proc.pid
    try:
        url = f"http://127.0.0.1:{port}"
        if not _wait_http(url + "/moto-api/"):
            raise ServerUnavailable(f"moto_server did not answer on {url}")
        import boto3

        boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="fsrdzv-bench")
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
        }
        yield "s3://fsrdzv-bench/rdzv", options
    finally:
        SERVER_PIDS.pop("moto", None)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


@contextlib.contextmanager
def etcd_server() -> Iterator[tuple[str, int]]:
    """Debian's etcd 3.4 with the v2 API on loopback: yields ``(host, client_port)``."""
    exe = shutil.which("etcd")
    if exe is None:
        raise ServerUnavailable("etcd is not installed (apt-get install -y etcd-server etcd-client)")
    data = tempfile.mkdtemp(prefix="fsrdzv-bench-etcd-")
    cport, pport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--name", "fsrdzv-bench",
            "--data-dir", os.path.join(data, "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{cport}",
            "--advertise-client-urls", f"http://127.0.0.1:{cport}",
            "--listen-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-cluster", f"fsrdzv-bench=http://127.0.0.1:{pport}",
            "--enable-v2=true",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        if not _wait_http(f"http://127.0.0.1:{cport}/health"):
            raise ServerUnavailable("etcd did not become healthy")
        yield "127.0.0.1", cport
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(data, ignore_errors=True)
