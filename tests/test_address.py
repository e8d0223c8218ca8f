"""Address candidates, their order, probing and the loopback guard (issue 15 §1; fsrdzv._address).

Probes here only connect to this machine's own interface addresses (traffic stays on the host); the cross-host
path with real hosts is tests/test_multihost.py's "loopback host names without --local-addr".
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fsrdzv import ConfigurationError, create_handler
from fsrdzv._address import (
    GLOO_IFNAME_ENV,
    AddressChoice,
    Identity,
    candidates,
    interface_addresses,
    is_loopback,
    local_identity,
    reach,
)
from fsrdzv._state import NodeInfo, RendezvousState

OWN = interface_addresses()
needs_interface = pytest.mark.skipif(not OWN, reason="this machine has no non-loopback interface address")


def _state(hosts: dict[str, str], master: tuple[str, int] = ("published", 4242)) -> RendezvousState:
    """A completed round of nodes named by ``hosts`` (node name -> host name), ranked in that order."""
    nodes = {name: NodeInfo(name, 1, i, "abc", 0, host) for i, (name, host) in enumerate(hosts.items())}
    ids = {n.node_id: n for n in nodes.values()}
    return RendezvousState(
        run_id="job",
        epoch="e",
        generation=3,
        round=1,
        complete=True,
        participants={nid: rank for rank, nid in enumerate(ids)},
        nodes=ids,
        master=master,
        roster=tuple(n.addr for n in nodes.values()),
    )


def _id(state: RendezvousState, rank: int) -> str:
    return next(n for n, r in state.participants.items() if r == rank)


def _beat(identity: Identity) -> bytes:
    return json.dumps({"n": 3, **identity.beat_fields()}).encode()


class _Probes:
    """A stand-in for :func:`reach` that records its calls and answers with ``answer``."""

    def __init__(self, answer: str | None) -> None:
        self.answer = answer
        self.calls: list[tuple[tuple[str, ...], int, frozenset[str]]] = []

    def __call__(self, addrs: tuple[str, ...], port: int, skip: frozenset[str]) -> str | None:
        self.calls.append((tuple(addrs), port, skip))
        return self.answer


@pytest.fixture(autouse=True)
def _no_gloo_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Set, then deleted: whatever the code under test exports is undone after the test.
    monkeypatch.setenv(GLOO_IFNAME_ENV, "")
    monkeypatch.delenv(GLOO_IFNAME_ENV)
    yield


# -- candidates ---------------------------------------------------------------------------------------------


def test_an_explicit_local_addr_is_the_only_candidate() -> None:
    assert candidates("10.1.2.3") == ("10.1.2.3",)
    identity = local_identity("node7.example")
    assert identity.addrs == ("node7.example",) and identity.explicit
    assert identity.beat_fields()["explicit"] is True


def test_a_host_name_that_resolves_to_loopback_is_not_a_candidate() -> None:
    found = candidates(None, name="localhost")
    assert "localhost" not in found
    assert not any(is_loopback(a) for a in found), found
    assert found == tuple(OWN)


@needs_interface
def test_a_host_name_that_resolves_outward_comes_first() -> None:
    found = candidates(None, name=OWN[0])
    assert found[0] == OWN[0] and len(found) == len(set(found))


@needs_interface
def test_the_default_route_interface_comes_first() -> None:
    rows = [line.split() for line in Path("/proc/net/route").read_text().splitlines()[1:]]
    default = [row[0] for row in rows if row[1] == "00000000" and row[7] == "00000000"]
    if not default:
        pytest.skip("no IPv4 default route")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", default[0].encode()[:15]))  # SIOCGIFADDR
    assert OWN[0] == socket.inet_ntoa(raw[20:24]), OWN


def test_loopback_addresses_and_names() -> None:
    assert all(is_loopback(a) for a in ("127.0.0.1", "127.0.1.1", "::1", "localhost", "LOCALHOST."))
    assert not any(is_loopback(a) for a in ("10.0.0.1", "fd00::2", "h1", "example.org"))


# -- the heartbeat carries them -----------------------------------------------------------------------------


def test_old_and_new_beats_are_read() -> None:
    assert Identity.from_beat(b'{"n":12}') is None
    assert Identity.from_beat(b"not json") is None and Identity.from_beat(None) is None
    identity = Identity(("h1", "10.0.0.1"), "h1", "0123456789ab")
    assert Identity.from_beat(_beat(identity)) == identity


def test_the_heartbeat_record_publishes_the_candidates(tmp_path: Path) -> None:
    with create_handler(str(tmp_path), "job", 1, 1, last_call_timeout=0.1) as handler:
        info = handler.next_rendezvous()
        raw = handler.store.read_record("hb", handler.node_id)
        assert raw is not None
        body = json.loads(raw)
        me = local_identity(None)
        assert body["n"] >= 1 and body["addrs"] == list(me.addrs) and body["host"] == socket.gethostname()
        assert len(body["boot"]) == 12 and len(raw) < 200, raw
        # Alone on its host, rank 0 is handed its first candidate.
        assert info.master_addr == (me.addrs[0] if me.addrs else socket.getfqdn())


# -- probing ------------------------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[int]:
    """A port listening on every interface of this machine (IPv6 too where it has it)."""
    if socket.has_dualstack_ipv6():
        sock = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
        sock = socket.create_server(("", 0))
    with sock:
        yield sock.getsockname()[1]


@needs_interface
def test_the_first_candidate_that_answers_wins(listener: int) -> None:
    unresolvable = "no-such-host.invalid"
    assert reach([unresolvable, "127.0.0.1", *OWN], listener, frozenset()) == OWN[0]
    assert reach(list(reversed(OWN)), listener, frozenset()) == OWN[-1]


@needs_interface
def test_loopback_and_the_probers_own_addresses_never_count(listener: int) -> None:
    assert reach(["127.0.0.1", "localhost"], listener, frozenset()) is None
    assert reach(OWN, listener, frozenset(OWN)) is None


@needs_interface
def test_a_refused_connection_is_an_answer() -> None:
    with socket.socket() as s:
        s.bind((OWN[0] if ":" not in OWN[0] else "", 0))
        port = s.getsockname()[1]  # bound, not listening: the host refuses
    assert reach([OWN[0]], port, frozenset()) == OWN[0]


# -- the choice ---------------------------------------------------------------------------------------------

ME = Identity(("h2", "10.0.0.2"), "h2", "bbbb", own=frozenset({"10.0.0.2"}))
LEADER = Identity(("h1", "10.0.0.1", "fd00::1"), "h1", "aaaa")


def test_rank_0_is_handed_its_first_candidate() -> None:
    state = _state({"a": "h1", "b": "h2"})
    choice = AddressChoice(Identity(("10.0.0.1",), "h1", "aaaa"), reach_fn=_Probes(None))
    assert choice.choose(state, _id(state, 0), lambda n: None) == "10.0.0.1"


def test_a_peer_on_another_host_takes_the_first_it_reached() -> None:
    state = _state({"a": "h1", "b": "h2"})
    probes = _Probes("10.0.0.1")
    beats = {_id(state, 0): _beat(LEADER)}
    assert AddressChoice(ME, reach_fn=probes).choose(state, _id(state, 1), beats.get) == "10.0.0.1"
    assert probes.calls == [(LEADER.addrs, 4242, ME.own)]


def test_nothing_answered_falls_back_to_rank_0s_first_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    state = _state({"a": "h1", "b": "h2"})
    beats = {_id(state, 0): _beat(LEADER)}
    with caplog.at_level(logging.WARNING, logger="fsrdzv"):
        assert AddressChoice(ME, reach_fn=_Probes(None)).choose(state, _id(state, 1), beats.get) == "h1"
    assert "--local-addr" in caplog.text


def test_no_probe_on_rank_0s_host_for_an_explicit_address_or_an_old_node() -> None:
    state = _state({"a": "h1", "b": "h1"})
    same = Identity(("h1", "10.0.0.1"), "h1", "aaaa")
    probes = _Probes("never")
    beats: dict[str, bytes] = {_id(state, 0): _beat(same)}
    assert AddressChoice(same, reach_fn=probes).choose(state, _id(state, 1), beats.get) == "h1"
    explicit = Identity(("node1.example",), "h1", "aaaa", explicit=True)
    beats[_id(state, 0)] = _beat(explicit)
    assert AddressChoice(ME, reach_fn=probes).choose(state, _id(state, 1), beats.get) == "node1.example"
    beats[_id(state, 0)] = b'{"n":4}'
    assert AddressChoice(ME, reach_fn=probes).choose(state, _id(state, 1), beats.get) == "published"
    assert AddressChoice(ME, reach_fn=probes).choose(state, _id(state, 1), lambda n: None) == "published"
    assert probes.calls == []


# -- the loopback guard -------------------------------------------------------------------------------------


@pytest.mark.parametrize("addrs", [(), ("127.0.0.1",), ("localhost", "::1")])
def test_a_peer_on_another_host_fails_at_once_on_loopback_only(addrs: tuple[str, ...]) -> None:
    state = _state({"a": "h1", "b": "h2"})
    beats = {_id(state, 0): _beat(Identity(addrs, "h1", "aaaa"))}
    with pytest.raises(ConfigurationError) as err:
        AddressChoice(ME, reach_fn=_Probes("x")).choose(state, _id(state, 1), beats.get)
    message = str(err.value)
    assert "\n" not in message and "--local-addr" in message and "local_addr=" in message, message


def test_same_host_name_other_boot_is_another_host() -> None:
    state = _state({"a": "h1", "b": "h1"})
    beats = {_id(state, 0): _beat(Identity((), "h1", "aaaa"))}
    other_boot = Identity(("10.0.0.2",), "h1", "cccc")
    with pytest.raises(ConfigurationError, match="--local-addr"):
        AddressChoice(other_boot, reach_fn=_Probes("x")).choose(state, _id(state, 1), beats.get)
    same = Identity((), "h1", "aaaa")
    assert AddressChoice(same, reach_fn=_Probes("x")).choose(state, _id(state, 1), beats.get) == "published"


def test_rank_0_with_loopback_only_fails_when_others_are_elsewhere() -> None:
    loop = Identity((), "h1", "aaaa")
    state = _state({"a": "h1", "b": "h2", "c": "h3"})
    with pytest.raises(ConfigurationError, match=r"other hosts \(h2, h3\).*--local-addr"):
        AddressChoice(loop, reach_fn=_Probes(None)).choose(state, _id(state, 0), lambda n: None)
    local = _state({"a": "h1", "b": "h1"})
    assert AddressChoice(loop, reach_fn=_Probes(None)).choose(local, _id(local, 0), lambda n: None) == "published"


def test_gloo_is_pointed_at_the_default_interface_only_across_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    me = Identity(("10.0.0.2",), "h2", "bbbb", gloo_ifname="eth0")
    beats: dict[str, Any] = {}
    local = _state({"a": "h2", "b": "h2"})
    AddressChoice(me, reach_fn=_Probes(None)).choose(local, _id(local, 1), beats.get)
    assert GLOO_IFNAME_ENV not in os.environ
    spread = _state({"a": "h1", "b": "h2"})
    AddressChoice(me, reach_fn=_Probes(None)).choose(spread, _id(spread, 1), beats.get)
    assert os.environ[GLOO_IFNAME_ENV] == "eth0"
    monkeypatch.setenv(GLOO_IFNAME_ENV, "ib0")  # the user's choice stays
    AddressChoice(me, reach_fn=_Probes(None)).choose(spread, _id(spread, 1), beats.get)
    assert os.environ[GLOO_IFNAME_ENV] == "ib0"
