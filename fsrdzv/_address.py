"""Which address of rank 0 each node is handed as ``master_addr`` (issue 15 §1).

Rank 0 used to publish ``local_addr or socket.getfqdn()``, like torch. Where the host name resolves to loopback
(``127.0.1.1`` in ``/etc/hosts``, containers, nodes without forward DNS) that silently handed every other host an
address of its own loopback. Now each node publishes its *candidates* in its heartbeat record, and rank 0 in the
documents it writes too (``RendezvousState.lead``: the others then need not read its record; optional fields, so
older nodes interoperate):

- an explicit ``local_addr``, alone (it always wins);
- else the host name if it resolves to a non-loopback address, then the addresses of the non-loopback interfaces
  that are up, the interface of the default route first (IPv4 before IPv6 on each; no link-local ones).

Once a round is complete, rank 0 is handed its first candidate, and every other node the first candidate, in
rank 0's order, that it *reached*: a TCP connect to rank 0's master port answered within :data:`PROBE_TIMEOUT`
(accepted: rank 0 holds that port open from its join until its server takes it over; or refused by rank 0's
host). A candidate that is loopback, or one of the prober's own addresses while it is on another host, never
counts; a node on rank 0's own host takes rank 0's first candidate without probing. Each node takes the first
it reached rather than one all agree on, because agreeing costs a second exchange through the storage after
completion, and a node only needs an address *it* can reach.

The loopback guard: a node on another host than rank 0 (another host name or boot id) while rank 0 has no
candidate but a loopback one fails at once with one line naming ``--local-addr``/``local_addr=`` (rank 0 fails
the same way when it sees participants on other hosts): never a connection timeout later. All nodes on one host
may use loopback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._errors import ConfigurationError
from ._state import RendezvousState

__all__ = ["PROBE_TIMEOUT", "AddressChoice", "Identity", "candidates", "is_loopback", "local_identity", "reach"]

log = logging.getLogger("fsrdzv")

#: Seconds a peer waits for rank 0's candidates to answer (all are tried at once; a SYN lost once is resent
#: after 1 s, so a little more than that).
PROBE_TIMEOUT: Final = 1.5
_SIOCGIFFLAGS: Final = 0x8913
_SIOCGIFADDR: Final = 0x8915
_IFF_UP: Final = 0x1
_IFF_LOOPBACK: Final = 0x8
#: gloo's interface switch (torch reads it when a process group's default device is made).
GLOO_IFNAME_ENV: Final = "GLOO_SOCKET_IFNAME"
#: Characters of the boot id a heartbeat carries (enough to tell two hosts apart).
_BOOT_CHARS: Final = 12


@dataclass(frozen=True)
class Identity:
    """What a node publishes about where it runs: its address candidates, host name and boot id."""

    addrs: tuple[str, ...]
    host: str
    boot: str
    #: Whether ``addrs`` is an explicit ``local_addr`` (then it is used even if nothing answers).
    explicit: bool = False
    #: This host's own interface addresses (never published: a prober on another host skips them).
    own: frozenset[str] = field(default=frozenset(), compare=False)
    #: The interface gloo should use when the host name resolves to loopback (None: gloo's own choice is fine).
    gloo_ifname: str | None = field(default=None, compare=False)

    def beat_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"addrs": list(self.addrs), "host": self.host, "boot": self.boot}
        if self.explicit:
            fields["explicit"] = True
        return fields

    @classmethod
    def from_beat(cls, raw: bytes | None) -> Identity | None:
        """The identity in a heartbeat record; None for an old ``{"n": ..}`` beat or an unreadable one."""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("addrs"), list):
            return None
        addrs = tuple(str(a) for a in body["addrs"] if isinstance(a, str) and a)
        return cls(addrs, str(body.get("host", "")), str(body.get("boot", "")), bool(body.get("explicit", False)))

    def same_host(self, other: Identity) -> bool:
        """Whether ``other`` runs on this host (unknown parts count as the same: no guard on old nodes)."""
        if self.host and other.host and self.host != other.host:
            return False
        return not (self.boot and other.boot and self.boot != other.boot)


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` (an address or ``localhost``) is a loopback address."""
    if addr.lower().rstrip(".") in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _resolved(name: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def _default_interfaces() -> list[str]:
    """Names of the interfaces that carry a default route (IPv4, then IPv6), from /proc."""
    names: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 7 and cols[1] == "00000000" and cols[7] == "00000000":
                names.append(cols[0])
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            cols = line.split()
            if len(cols) == 10 and cols[0] == "0" * 32 and cols[1] == "00" and cols[9] != "lo":
                names.append(cols[9])
    return list(dict.fromkeys(names))


def _ipv4_of(name: str) -> str | None:
    """The IPv4 address of an interface that is up and not loopback (None otherwise)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("256s", name.encode()[:15])
        try:
            flags = struct.unpack("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)[16:18])[0]
            if not flags & _IFF_UP or flags & _IFF_LOOPBACK:
                return None
            return socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
        except OSError:  # no IPv4 address on it
            return None


def _ipv6_by_interface() -> dict[str, list[str]]:
    """Global-scope IPv6 addresses by interface name, from /proc/net/if_inet6."""
    found: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            cols = line.split()
            if len(cols) == 6 and cols[3] == "00" and cols[5] != "lo":
                addr = str(ipaddress.IPv6Address(bytes.fromhex(cols[0])))
                found.setdefault(cols[5], []).append(addr)
    return found


def interface_addresses() -> list[str]:
    """Non-loopback addresses of the interfaces that are up, the default route's interface first."""
    return list(dict.fromkeys(addr for _, addr in _interfaces()))


def _interfaces() -> list[tuple[str, str]]:
    """(interface name, address) of the non-loopback interfaces that are up, the default route's first."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    first = [n for n in _default_interfaces() if n in names]
    v6 = _ipv6_by_interface()
    found: list[tuple[str, str]] = []
    for name in first + [n for n in names if n not in first]:
        v4 = _ipv4_of(name)
        found += [(name, a) for a in ([v4] if v4 else []) + v6.get(name, []) if not is_loopback(a)]
    return found


def candidates(local_addr: str | None, name: str | None = None) -> tuple[str, ...]:
    """This node's address candidates (see the module docstring); ``name`` defaults to ``socket.getfqdn()``."""
    if local_addr:
        return (local_addr,)
    name = name if name is not None else socket.getfqdn()
    found = []
    resolved = _resolved(name)
    if resolved and not any(is_loopback(a) for a in resolved):
        found.append(name)
    found += interface_addresses()
    return tuple(dict.fromkeys(found))


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:_BOOT_CHARS]
    except OSError:
        return ""


@functools.lru_cache(maxsize=8)
def local_identity(local_addr: str | None) -> Identity:
    """This node's identity (the interfaces are read once per process and ``local_addr``)."""
    found = _interfaces()
    host = socket.gethostname()
    # gloo advertises the address its host name resolves to (torch's default device): a loopback one would be
    # unreachable from other hosts, so it is pointed at the default route's interface instead.
    resolved = _resolved(host)
    ifname = found[0][0] if found and (not resolved or any(is_loopback(a) for a in resolved)) else None
    own = frozenset(addr for _, addr in found)
    return Identity(candidates(local_addr), host, _boot_id(), explicit=bool(local_addr), own=own, gloo_ifname=ifname)


def _answers(addr: str, port: int, skip: frozenset[str], timeout: float) -> bool:
    """Whether a TCP connect to ``addr:port`` is answered by a host other than the ones ``skip`` names."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    for family, kind, proto, _, sockaddr in infos:
        ip = str(sockaddr[0])
        if is_loopback(ip) or ip in skip:
            continue
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(timeout)
            code = sock.connect_ex(sockaddr)
        if code in (0, errno.ECONNREFUSED):
            return True
    return False


def reach(addrs: Sequence[str], port: int, skip: frozenset[str], timeout: float = PROBE_TIMEOUT) -> str | None:
    """The first of ``addrs`` that answers on ``port`` (all probed at once, for at most ``timeout``)."""
    results: list[bool | None] = [None] * len(addrs)

    def probe(i: int) -> None:
        results[i] = _answers(addrs[i], port, skip, timeout)

    threads = [threading.Thread(target=probe, args=(i,), daemon=True) for i in range(len(addrs))]
    for thread in threads:
        thread.start()
    for i, thread in enumerate(threads):
        thread.join(timeout + 1.0)
        if results[i]:
            return addrs[i]
    return None


class AddressChoice:
    """The ``master_addr`` this node is handed for a completed round (see the module docstring)."""

    def __init__(self, me: Identity, *, reach_fn: Callable[..., str | None] = reach) -> None:
        self.me = me
        self._reach = reach_fn

    def choose(self, state: RendezvousState, node_id: str, rank0_beat: Callable[[str], bytes | None]) -> str:
        """The master address for this node in the completed round of ``state``."""
        assert state.master is not None
        self._point_gloo(state)
        published, port = state.master
        rank0 = next((n for n, r in state.participants.items() if r == 0), None)
        if rank0 is None:
            return published  # rank 0 already left the round (removed): nothing to probe
        if rank0 == node_id:
            self._guard_as_rank0(state, node_id)
            return self.me.addrs[0] if self.me.addrs else published
        leader = Identity.from_beat(rank0_beat(rank0))
        if leader is None:
            return published  # an fsrdzv without candidates (or its beat is gone): what it published
        same = self.me.same_host(leader)
        if not same and (not leader.addrs or all(is_loopback(a) for a in leader.addrs)):
            raise _loopback_error(state.run_id, leader, self.me.host)
        if leader.explicit or same or not leader.addrs:
            # An explicit local_addr always wins; on rank 0's own host its first candidate is one of its own.
            return leader.addrs[0] if leader.addrs else published
        got = self._reach(leader.addrs, port, self.me.own)
        if got is None:
            log.warning(
                "none of rank 0's addresses %s answered on port %d within %gs; using %s (if the job cannot connect, "
                "start the nodes with --local-addr / local_addr= naming an address the others reach)",
                ", ".join(leader.addrs),
                port,
                PROBE_TIMEOUT,
                leader.addrs[0],
            )
            return leader.addrs[0]
        return got

    def _point_gloo(self, state: RendezvousState) -> None:
        """With participants on other hosts and a host name that resolves to loopback, ``GLOO_SOCKET_IFNAME``
        names the default route's interface for this process and the workers it starts (unless already set)."""
        ifname = self.me.gloo_ifname
        if ifname is None or os.environ.get(GLOO_IFNAME_ENV):
            return
        hosts = {info.host for n, info in state.nodes.items() if n in state.participants and info.host}
        if hosts - {self.me.host}:
            os.environ[GLOO_IFNAME_ENV] = ifname
            log.info("host name %r resolves to loopback: %s=%s for gloo", self.me.host, GLOO_IFNAME_ENV, ifname)

    def _guard_as_rank0(self, state: RendezvousState, node_id: str) -> None:
        if self.me.addrs and not all(is_loopback(a) for a in self.me.addrs):
            return
        others = sorted({info.host for n, info in state.nodes.items() if n in state.participants and info.host})
        elsewhere = [h for h in others if h != self.me.host]
        if elsewhere:
            raise _loopback_error(state.run_id, self.me, ", ".join(elsewhere), rank0=True)


def _loopback_error(run_id: str, leader: Identity, other: str, *, rank0: bool = False) -> ConfigurationError:
    where = "this node, rank 0," if rank0 else f"rank 0 ({leader.host or 'another host'})"
    has = ", ".join(leader.addrs) if leader.addrs else "its host name resolves to loopback and no interface is up"
    return ConfigurationError(
        f"run {run_id!r}: {where} has only loopback addresses ({has}) but nodes on other hosts ({other}) joined; "
        "start every node with --local-addr ADDRESS (local_addr= in Python, FSRDZV_LOCAL_ADDR) naming an address "
        "the other hosts reach"
    )
