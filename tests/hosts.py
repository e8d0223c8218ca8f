"""Several "hosts" on one machine for the multi-host tests: network namespaces on a bridge, each with its host name.

A :class:`Network` is a private bridge namespace (``<prefix>-br``, bridge ``br0`` at ``10.213.0.1/24``) and N host
namespaces (``<prefix>-h1`` ...), each joined to the bridge by a veth pair (``eth0`` in the host, ``hI`` on the
bridge) with the address ``10.213.0.(10+I)``, its loopback up and a default route through the bridge (which has no
uplink: nothing leaves the namespaces created here). The test range ``10.213.0.0/24`` exists only inside them.

Every process started on a host (:meth:`Host.start`) runs in the host's network namespace *and* in UTS and mount
namespaces of its own, with the host name set (``h1`` ...) and, depending on ``names``:

* ``"resolvable"``: ``/etc/hosts`` is bind-mounted over with a file that maps every host name to its bridge
  address (what working DNS gives);
* ``"loopback"``: the file maps only the host's own name, to ``127.0.1.1`` (Debian's default, also common in
  containers and on Slurm nodes without forward DNS): a host cannot resolve its peers' names, and its own name
  resolves to loopback;
* ``"machine"``: the machine's own ``/etc/hosts`` (no host name resolves at all).

``/etc/resolv.conf`` is always replaced by one naming a DNS server on the host's own loopback, where nothing
listens: a name missing from the hosts file fails at once (as without DNS) instead of after the 5 s timeouts of a
server the namespace cannot reach. Nothing is written outside the test's work directory: the files are bind mounts
in each process's private mount namespace (``/etc/netns`` is not used). The file system is shared, so a temporary
directory is "shared storage".

A host's processes are found by their network namespace (what ``ip netns pids`` does), orphans and torchrun's
workers (which start sessions of their own) included, so :meth:`Host.kill` / :meth:`Host.freeze` /
:meth:`Host.thaw` act on the whole host. :meth:`Host.link_down` / :meth:`Host.link_up` cut and restore its
network at the bridge (carrier loss: packets are dropped, connections time out rather than fail at once; pass
``side="host"`` to down ``eth0`` inside the host instead, where sends fail with "network unreachable").
:meth:`Network.start_s3` runs moto in the bridge namespace on ``10.213.0.1``, reachable from every host.

Use :func:`network` (a context manager) from a fixture; it kills every process of every namespace and deletes the
namespaces when it exits, passed or failed, and a watchdog kills the hosts' processes when ``max_seconds`` pass.
Names carry the test process's pid and a counter. A process started here dies with the test process
(PR_SET_PDEATHSIG), its children (torchrun's workers) do not: namespaces left by a test process that was killed
are swept, with everything still running in them, when the next network is built. :func:`require_namespaces`
skips without root or ``ip netns``, and fails when ``CI`` is set.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import pytest

from tests.servers import in_ci

T = TypeVar("T")
Names = Literal["resolvable", "loopback", "machine"]

SUBNET = "10.213.0"
BRIDGE_ADDR = f"{SUBNET}.1"
PREFIX = "fsrdzv-mh"
#: Seconds any one ``ip`` command may take.
IP_TIMEOUT = 10.0
#: The moto port inside the bridge namespace (private to it, so a fixed port cannot collide).
S3_PORT = 9000
S3_START_TIMEOUT = 60.0
#: Hard bound of one network's life: then the watchdog kills all its processes.
MAX_SECONDS = 300.0

_CLONE_NEWNET = 0x40000000
_SEQ = iter(range(1, 1_000_000))
_OPEN: list[Network] = []

# The start-up of a host process: host name, then (optionally) the hosts file, then the program.
_ENTER = (
    'hostname "$1" || exit 97; mount --bind "$2" /etc/resolv.conf || exit 98; '
    'if [ -n "$3" ]; then mount --bind "$3" /etc/hosts || exit 98; fi; shift 3; exec "$@"'
)
#: No DNS server: queries fail at once (nothing listens on the host's loopback), not after a 5 s timeout each.
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


class NamespaceUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no ``ip``, or the kernel refuses)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (bounded by IP_TIMEOUT); raise NamespaceUnavailable with its stderr when ``check`` fails."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespaceUnavailable(f"ip {' '.join(args)}: {exc}") from exc
    if check and done.returncode != 0:
        raise NamespaceUnavailable(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (creates and deletes a probe)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "set", "lo", "up")
        out = subprocess.run(
            ["ip", "netns", "exec", probe, "unshare", "--uts", "--mount", "--", "sh", "-c", "hostname probe"],
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
        if out.returncode != 0:
            return f"cannot enter a namespace with unshare --uts --mount: {out.stderr.strip()}"
    except (NamespaceUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        ip("netns", "del", probe, check=False)
    return None


def require_namespaces() -> None:
    """Skip the calling test when namespaces are unavailable; fail it instead when CI is set (never skip in CI)."""
    reason = namespaces_unavailable()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"multi-host tests need network namespaces: {reason} (CI is set: they must run)", pytrace=False)
    pytest.skip(f"network namespaces unavailable: {reason}")


# -- processes -----------------------------------------------------------------------------------------------


def _netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def pids_in_netns(name: str) -> list[int]:
    """Every process whose network namespace is ``name`` (as ``ip netns pids``)."""
    try:
        wanted = f"net:[{_netns_inode(name)}]"
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/net") == wanted:
                    found.append(int(entry))
    return found


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _kill_netns(name: str, timeout: float = 10.0) -> None:
    """Freeze then SIGKILL everything in the namespace, repeating until it is empty (new children included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = pids_in_netns(name)
        if not pids:
            return
        _signal_all(pids, signal.SIGSTOP)
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.05)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Proc:
    """One process started on a host, with its log (stdout and stderr)."""

    def __init__(self, host: Host | None, name: str, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
        #: None for a process in the bridge namespace (the S3 server).
        self.host = host
        #: The host name, or "bridge".
        self.where = host.name if host is not None else "bridge"
        self.name = name
        self.argv = argv
        self.log_path = cwd / f"{self.where}-{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=str(cwd),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int:
        """The exit status; raise ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        return self.popen.wait(timeout)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def close(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        self._log.close()


class Host:
    """A network namespace with an address on the bridge; processes started here get their own host name."""

    def __init__(self, network: Network, index: int) -> None:
        self.network = network
        self.index = index
        self.name = f"h{index}"
        self.netns = f"{network.prefix}-{self.name}"
        self.addr = f"{SUBNET}.{10 + index}"
        self.procs: list[Proc] = []
        self.hosts_file: Path | None = None
        #: Set by :meth:`kill`: its processes' deaths are expected.
        self.killed = False

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.addr})"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run on this host (network, host name, hosts file)."""
        hosts = str(self.hosts_file) if self.hosts_file is not None else ""
        enter = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "--", "sh", "-c", _ENTER, "sh"]
        return [*enter, self.name, str(self.network.resolv_conf), hosts, *argv]

    def start(self, argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None) -> Proc:
        """Start ``argv`` on this host in the background, logging to ``<workdir>/<host>-<name>.log``.

        The environment is the test's, plus ``env``, plus ``MH_HOST`` (the host name) and ``MH_ADDR`` (its address).
        """
        full = dict(os.environ)
        full.update(env or {})
        full.update({"MH_HOST": self.name, "MH_ADDR": self.addr})
        proc = Proc(self, name, self.command(argv), full, self.network.workdir)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host to completion (bounded) and return its output."""
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, check=False)

    def pids(self) -> list[int]:
        return pids_in_netns(self.netns)

    def signal(self, sig: int) -> list[int]:
        """Send ``sig`` to every process of this host; return their pids."""
        pids = self.pids()
        _signal_all(pids, sig)
        return pids

    def kill(self) -> None:
        """The machine dies: freeze every process of the host (so none reacts), then SIGKILL them all."""
        self.killed = True
        _kill_netns(self.netns)

    def freeze(self) -> None:
        """The machine hangs (VM pause, stuck kernel): SIGSTOP every process, twice to catch fresh children."""
        for _ in range(2):
            self.signal(signal.SIGSTOP)
            time.sleep(0.05)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def link_down(self, side: Literal["bridge", "host"] = "bridge") -> None:
        """Cut the host off the network: its bridge port (carrier loss, packets dropped) or its own ``eth0``."""
        if side == "bridge":
            ip("-n", self.network.bridge_netns, "link", "set", self.name, "down")
        else:
            ip("-n", self.netns, "link", "set", "eth0", "down")

    def link_up(self) -> None:
        """Restore both ends and the default route (the kernel drops it with the link)."""
        ip("-n", self.network.bridge_netns, "link", "set", self.name, "up")
        ip("-n", self.netns, "link", "set", "eth0", "up")
        ip("-n", self.netns, "route", "replace", "default", "via", BRIDGE_ADDR)


# -- the network ---------------------------------------------------------------------------------------------


def _in_netns(netns: str, fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn`` in a thread that entered ``netns`` (setns is per thread for network namespaces)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"in-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"call in namespace {netns} did not finish within {timeout}s")
    if error:
        raise error[0]
    return result[0]


class S3:
    """moto in the bridge namespace: ``s3://<bucket>`` at ``endpoint_url``, reachable from every host."""

    def __init__(self, proc: Proc, endpoint_url: str, bucket: str) -> None:
        self.proc = proc
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        #: What a process needs to reach it (credentials; the endpoint URL goes in ``--rdzv-conf``).
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def url(self, prefix: str | None = None) -> str:
        return f"s3://{self.bucket}/{prefix or 't-' + uuid.uuid4().hex[:10]}"


class Network:
    """A bridge namespace and ``n`` hosts on it. Prefer :func:`network`, which always cleans up."""

    def __init__(self, n: int, workdir: Path, *, names: Names = "resolvable", max_seconds: float = MAX_SECONDS) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_SEQ)}"
        self.workdir = workdir
        self.names = names
        self.bridge_netns = f"{self.prefix}-br"
        self.resolv_conf = workdir / "resolv.conf"
        self.hosts = [Host(self, i) for i in range(1, n + 1)]
        self.bridge_procs: list[Proc] = []
        self._created: list[str] = []
        self._closed = False
        self._watchdog = threading.Timer(max_seconds, self._expire)
        self._watchdog.daemon = True
        self.expired = False
        _OPEN.append(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self._watchdog.start()

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        _sweep_stale()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.resolv_conf.write_text(RESOLV_CONF)
        br = self.bridge_netns
        self._add_netns(br)
        ip("-n", br, "link", "add", "br0", "type", "bridge")
        ip("-n", br, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
        ip("-n", br, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_netns(host.netns)
            ip("-n", br, "link", "add", host.name, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            ip("-n", br, "link", "set", host.name, "master", "br0")
            ip("-n", br, "link", "set", host.name, "up")
            ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "up")
            ip("-n", host.netns, "route", "add", "default", "via", BRIDGE_ADDR)
            host.hosts_file = self._hosts_file(host)

    def _hosts_file(self, host: Host) -> Path | None:
        if self.names == "machine":
            return None
        lines = ["127.0.0.1 localhost"]
        if self.names == "resolvable":
            lines += [f"{h.addr} {h.name}" for h in self.hosts]
        else:
            lines.append(f"127.0.1.1 {host.name}")
        path = self.workdir / f"{host.name}.hosts"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_s3(self) -> S3:
        """Start moto on ``10.213.0.1`` in the bridge namespace, create a bucket, and check it honours conditions."""
        argv = ["ip", "netns", "exec", self.bridge_netns, sys.executable, "-m", "moto.server"]
        argv += ["-H", BRIDGE_ADDR, "-p", str(S3_PORT)]
        proc = Proc(None, "s3", argv, os.environ, self.workdir)
        self.bridge_procs.append(proc)
        endpoint_url = f"http://{BRIDGE_ADDR}:{S3_PORT}"
        bucket = "fsrdzv-" + uuid.uuid4().hex[:10]
        _in_netns(self.bridge_netns, lambda: _prepare_bucket(endpoint_url, bucket, proc.popen), S3_START_TIMEOUT + 10)
        return S3(proc, endpoint_url, bucket)

    def procs(self) -> list[Proc]:
        return [p for h in self.hosts for p in h.procs]

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"===== {p.where} {p.name} (rc={p.poll()}) =====\n{p.tail(lines)}" for p in self.procs())

    def _expire(self) -> None:
        self.expired = True
        for host in self.hosts:
            host.thaw()
            host.kill()

    def close(self) -> None:
        """Kill every process of every namespace, delete the namespaces (and with them the veth pairs)."""
        if self._closed:
            return
        self._closed = True
        self._watchdog.cancel()
        for name in self._created:
            with contextlib.suppress(OSError):
                _signal_all(pids_in_netns(name), signal.SIGCONT)
            _kill_netns(name)
        for proc in [*self.procs(), *self.bridge_procs]:
            proc.close()
        for name in reversed(self._created):
            ip("netns", "del", name, check=False)
        if self in _OPEN:
            _OPEN.remove(self)


def _prepare_bucket(endpoint_url: str, bucket: str, popen: subprocess.Popen[bytes]) -> None:
    """Wait for moto, create the bucket, and refuse a server that ignores conditional writes (as tests/servers.py)."""
    # Through importlib: boto3 has no type information, and this keeps mypy from analysing it.
    boto3 = importlib.import_module("boto3")
    exceptions = importlib.import_module("botocore.exceptions")
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    deadline = time.monotonic() + S3_START_TIMEOUT
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"moto exited with {popen.returncode}")
        try:
            s3.create_bucket(Bucket=bucket)
            break
        except exceptions.EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    key = ".server-check/" + uuid.uuid4().hex
    s3.put_object(Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*")
    except exceptions.ClientError:
        pass
    else:
        raise RuntimeError("moto accepted a second create-if-absent: it cannot be used for CAS tests")
    s3.delete_object(Bucket=bucket, Key=key)


def _sweep_stale() -> None:
    """Delete namespaces that a test process now dead left behind (their names carry its pid)."""
    listing = ip("netns", "list", check=False).stdout
    for match in re.finditer(rf"^({re.escape(PREFIX)}(\d+)-\S+)", listing, re.MULTILINE):
        name, pid = match.group(1), int(match.group(2))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive: another test run's
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_netns(name)
        ip("netns", "del", name, check=False)


@atexit.register
def _close_all() -> None:
    for net in list(_OPEN):
        net.close()


@contextlib.contextmanager
def network(
    n: int, workdir: Path, *, names: Names = "resolvable", max_seconds: float = MAX_SECONDS
) -> Iterator[Network]:
    """``n`` hosts on a private bridge (see the module docstring); everything is gone when the block exits."""
    net = Network(n, workdir, names=names, max_seconds=max_seconds)
    try:
        yield net
    finally:
        net.close()


def wait_until(what: str, predicate: Callable[[], bool], timeout: float, *, net: Network | None = None) -> float:
    """Poll ``predicate`` every 0.1 s; return the seconds it took, or raise AssertionError (with ``net``'s logs) on
    timeout, or at once when a process of ``net`` exited with an error on a host that was not killed."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        failed = [p for p in net.procs() if p.host and not p.host.killed and p.poll() not in (None, 0)] if net else []
        if failed:
            raise AssertionError(
                f"{failed[0].where}'s {failed[0].name} exited with {failed[0].poll()} while waiting for {what}\n"
                f"{net.logs() if net else ''}"
            )
        time.sleep(0.1)
    logs = f"\n{net.logs()}" if net is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{logs}")


__all__ = [
    "BRIDGE_ADDR",
    "S3",
    "SUBNET",
    "Host",
    "Names",
    "NamespaceUnavailable",
    "Network",
    "Proc",
    "network",
    "pids_in_netns",
    "require_namespaces",
    "wait_until",
]
