"""Storage faults: injected transient errors, timeouts and lost replies; outages longer than the keep-alive timeout;
real disk-full, read-only, permission-denied and missing-directory file systems; and a randomized soak of real
handler threads whose every document version is checked against the protocol's invariants.

Real faults are used wherever this machine can produce them (tmpfs mounts, remounts, a non-root subprocess). The
injected ones go through :class:`fsrdzv.testing.FaultyStore`, the project's fault injector; each docstring says so.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import fsrdzv
from fsrdzv._state import RendezvousState, decode_request_name, decode_state, nonce_order
from fsrdzv._store import SealedStore, unseal
from fsrdzv._stores._file import FileStore
from fsrdzv._stores._memory import MemoryStore
from fsrdzv.testing import FakeClock, FaultyStore, LostReplyError, TransientFault

# -- helpers ---------------------------------------------------------------------------------------------------------


def _rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _fast_sleep(seconds: float) -> None:
    """For tests of permanent errors: the handler's retry back-off, without the wait."""
    time.sleep(min(seconds, 0.01))


class Versions:
    """Every committed document envelope, collected by the stores below (append is atomic under the GIL)."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    def states(self) -> list[tuple[int, RendezvousState]]:
        out = [unseal(raw, "a recorded version") for raw in self.raw]
        out.sort(key=lambda item: item[0])
        return [(generation, decode_state(payload, f"version {generation}")) for generation, payload in out]


class _Recording(SealedStore):
    """Mixin: record every committed document version into ``self.versions``."""

    versions: Versions

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        version = super()._commit(raw, generation, expected)  # type: ignore[safe-super]  # a mixin over a store
        if version is not None:
            self.versions.raw.append(raw)
        return version


class RecordingMemoryStore(_Recording, MemoryStore):
    def __init__(self, name: str, run_id: str, versions: Versions) -> None:
        super().__init__(name, run_id)
        self.versions = versions


class RecordingFileStore(_Recording, FileStore):
    def __init__(self, root: str, run_id: str, versions: Versions) -> None:
        super().__init__(root, run_id)
        self.versions = versions


class CountingFaulty(FaultyStore):
    """FaultyStore that also counts operations and lost CAS replies, and can lose the next N CAS replies.

    ``lost_own_folds`` counts lost CAS replies whose payload folded a join request nonce of ``owner`` that the
    owner had never seen in any document before: the reply of the node's own join was lost.
    """

    def __init__(self, inner: fsrdzv.Store, **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        self.ops = 0
        self.lost_cas = 0
        self.lost_own_folds = 0
        self.lose_next_cas = 0
        self.owner: str | None = None
        self._seen: set[str] = set()

    def _before(self, what: str) -> None:
        self.ops += 1
        super()._before(what)

    def _after_write(self, what: str) -> None:
        if what == "compare_and_set" and self.lose_next_cas > 0:
            self.lose_next_cas -= 1
            self.lost += 1
            raise LostReplyError(0, f"injected lost reply after {what} on {self.inner.location}")
        super()._after_write(what)

    def _own_nonce(self, data: bytes) -> str | None:
        try:
            return decode_state(data, "counting").applied.get(self.owner or "")
        except fsrdzv.RendezvousError:
            return None

    def read(self) -> fsrdzv.Snapshot | None:
        snap = super().read()
        if snap is not None and (nonce := self._own_nonce(snap.data)):
            self._seen.add(nonce)
        return snap

    def compare_and_set(self, data: bytes, token: object = None) -> fsrdzv.CasResult:
        try:
            result = super().compare_and_set(data, token)
        except LostReplyError:
            self.lost_cas += 1
            nonce = self._own_nonce(bytes(data))
            if nonce is not None and nonce not in self._seen:
                self.lost_own_folds += 1
            raise
        if result.snapshot is not None and (nonce := self._own_nonce(result.snapshot.data)):
            self._seen.add(nonce)
        return result


def check_versions(states: list[tuple[int, RendezvousState]], max_nodes: int) -> dict[str, int]:
    """The protocol's invariants on every committed version, in generation order. Returns counts."""
    assert states, "no document version was recorded"
    generations = [g for g, _ in states]
    assert generations == list(range(generations[0], generations[0] + len(generations))), "a generation repeats"
    completions = 0
    closed_epochs: set[str] = set()
    rounds: dict[tuple[str, int], tuple[dict[str, int], tuple[str, ...]]] = {}
    previous: RendezvousState | None = None
    for generation, state in states:
        where = f"generation {generation}"
        lists = [*state.participants, *state.wait_list, *state.redundancy_list]
        assert len(lists) == len(set(lists)), f"{where}: a node is in two lists: {state}"
        assert set(lists) == set(state.nodes), f"{where}: identities do not match the lists"
        assert len(state.participants) <= max_nodes, f"{where}: more than max_nodes participants"
        if previous is not None:
            assert state.generation > previous.generation, f"{where}: the document's generation did not increase"
            if state.epoch == previous.epoch:
                assert state.round >= previous.round, f"{where}: the round went back"
        if state.epoch in closed_epochs:
            assert state.closed, f"{where}: a closed run re-opened without a restart (new epoch)"
        if state.closed:
            closed_epochs.add(state.epoch)
        key = (state.epoch, state.round)
        if state.complete:
            assert state.last_call is None, f"{where}: a complete round in last call"
            if key not in rounds:
                completions += 1
                ranks = dict(state.participants)
                assert sorted(ranks.values()) == list(range(len(ranks))), f"{where}: ranks not dense: {ranks}"
                assert len(state.roster) == len(ranks)
                assert state.master is not None
                first = min(ranks, key=lambda n: ranks[n])
                assert state.master == (state.nodes[first].addr, state.nodes[first].port)
                rounds[key] = (ranks, tuple(state.roster))
            ranks, roster = rounds[key]
            assert tuple(state.roster) == roster, f"{where}: the roster of a completed round changed"
            for node, rank in state.participants.items():
                assert ranks.get(node) == rank, f"{where}: {node} changed rank or joined a completed round"
        else:
            assert key not in rounds, f"{where}: a completed round became incomplete again"
            assert all(r == 0 for r in state.participants.values()), f"{where}: ranks before completion"
        previous = state
    return {"versions": len(states), "completed_rounds": completions, "closed": len(closed_epochs)}


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout}s: {alive}"


# -- injected faults: 20 % of operations ----------------------------------------------------------------------------


def _faulty_stack(inner: fsrdzv.Store, seed: int) -> tuple[CountingFaulty, FaultyStore]:
    """Three faults, about 20 % of operations in all: 10 % fail at once (transient), 10 % fail after a 20 ms delay
    (timeouts: every operation of that layer is slow), and 6 % of writes lose their reply after succeeding."""
    slow = FaultyStore(inner, fail_rate=0.10, delay=0.02, seed=seed)
    outer = CountingFaulty(slow, fail_rate=0.10, lost_reply_rate=0.06, seed=seed + 1000)
    return outer, slow


@pytest.mark.parametrize(("backend", "count"), [("memory", 6), ("directory", 4)])
def test_formations_under_20_percent_injected_faults(tmp_path: Any, backend: str, count: int) -> None:
    """N nodes (threads) form three rounds in a row, each arriving after a random delay, while ~20 % of their storage
    operations fail transiently, time out or lose their reply after succeeding (FaultyStore: injected faults).
    Every round has unique dense ranks; every
    node's newest join request nonce is recorded as applied exactly once, with no node in two lists, on every
    committed document version; a closing shutdown still works. Prints the number of injected faults."""
    versions = Versions()
    rid = _rid("faults")
    name = f"faults-{uuid.uuid4().hex[:8]}"
    settings = fsrdzv.Settings(
        run_id=rid,
        min_nodes=count,
        max_nodes=count,
        join_timeout=60,
        last_call_timeout=0.5,
        keep_alive_interval=0.2,
        # 8 missed beats in a row at ~16 % write failures: a false death is ~1e-6 likely (see the outage tests).
        keep_alive_max_attempt=8,
    )
    stacks: list[tuple[CountingFaulty, FaultyStore]] = []
    handlers: list[fsrdzv.RendezvousHandler] = []
    for i in range(count):
        if backend == "memory":
            inner: fsrdzv.Store = RecordingMemoryStore(name, rid, versions)
        else:
            inner = RecordingFileStore(str(tmp_path / "rdzv"), rid, versions)
        outer, slow = _faulty_stack(inner, seed=1000 * i + count)
        handler = fsrdzv.RendezvousHandler(outer, settings, local_addr=f"10.0.0.{i + 1}")
        outer.owner = handler.node_id
        stacks.append((outer, slow))
        handlers.append(handler)
    rounds = 3
    infos: dict[int, list[fsrdzv.RendezvousInfo]] = {i: [] for i in range(count)}
    errors: list[BaseException] = []

    def node(i: int) -> None:
        rng = random.Random(i)
        try:
            for _ in range(rounds):
                time.sleep(rng.uniform(0, 0.4))  # staggered arrivals: more separate folds, more CASes to fault
                infos[i].append(handlers[i].next_rendezvous())
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=node, args=(i,), name=f"node-{i}") for i in range(count)]
    for t in threads:
        t.start()
    _join_all(threads, 90)
    formed = time.monotonic() - started
    assert not errors, errors
    for r in range(rounds):
        got = [infos[i][r] for i in range(count)]
        assert sorted(info.rank for info in got) == list(range(count)), got
        assert {info.world_size for info in got} == {count}
        assert len({info.round for info in got}) == 1
        assert len({(info.master_addr, info.master_port) for info in got}) == 1
    plain = MemoryStore(name, rid) if backend == "memory" else FileStore(str(tmp_path / "rdzv"), rid)
    snap = plain.read()
    assert snap is not None
    final = decode_state(snap.data, "final")
    assert set(final.participants) == {h.node_id for h in handlers}
    requests = [decode_request_name(name, plain.name_mac) for name in plain.list_records("req")]
    # A request record whose deletion failed may linger beside the newer one: harmless, since the newest wins.
    latest: dict[str, str] = {}
    for req in requests:
        assert req is not None
        order = nonce_order(req.nonce)
        assert order is not None
        if order > (nonce_order(latest.get(req.node.node_id, "0.")) or 0):
            latest[req.node.node_id] = req.nonce
    for h in handlers:
        assert final.applied[h.node_id] == latest[h.node_id]
    counts = check_versions(versions.states(), count)
    # Every node's nonces: each was folded by exactly one committed version (a retried fold never repeats it).
    introduced: Counter[tuple[str, str]] = Counter()
    before: dict[str, str] = {}
    for _, state in versions.states():
        for node_id, nonce in state.applied.items():
            if before.get(node_id) != nonce:
                introduced[(node_id, nonce)] += 1
        before = dict(state.applied)
    assert all(n == 1 for n in introduced.values()), introduced
    assert len(introduced) == count * rounds
    closed = [h.shutdown() for h in handlers]
    assert all(closed), closed
    transient = sum(o.injected for o, _ in stacks)
    timeouts = sum(s.injected for _, s in stacks)
    lost = sum(o.lost for o, _ in stacks)
    ops = sum(o.ops for o, _ in stacks)
    lost_cas = sum(o.lost_cas for o, _ in stacks)
    own = sum(o.lost_own_folds for o, _ in stacks)
    faults = transient + timeouts + lost
    print(
        f"\n{count} nodes x {rounds} rounds on {backend} in {formed:.1f}s: {ops} storage operations, {faults} faults "
        f"injected ({faults / ops:.0%}): {transient} transient, {timeouts} timeouts, {lost} lost replies "
        f"({lost_cas} of them CAS, {own} of a node's own join); {counts['versions']} document versions checked"
    )
    assert faults >= 0.15 * ops, "fewer faults than intended"
    assert lost >= 1


def test_lost_reply_of_own_join_is_recognised_as_own() -> None:
    """Node A's first compare-and-set (creating the document with its own join request folded) commits but its reply
    is lost (FaultyStore: one injected lost reply). A re-reads, finds its request nonce applied and never folds it
    again: exactly one version introduces A's nonce, A is listed once, and the round with B forms with dense ranks."""
    versions = Versions()
    rid = _rid("lost")
    name = f"lost-{uuid.uuid4().hex[:8]}"
    settings = fsrdzv.Settings(run_id=rid, min_nodes=2, max_nodes=2, join_timeout=30, keep_alive_interval=0.2)
    a_store = CountingFaulty(RecordingMemoryStore(name, rid, versions))
    a_store.lose_next_cas = 1
    a = fsrdzv.RendezvousHandler(a_store, settings, local_addr="10.0.0.1")
    b = fsrdzv.RendezvousHandler(RecordingMemoryStore(name, rid, versions), settings, local_addr="10.0.0.2")
    a_store.owner = a.node_id
    results: dict[str, Any] = {}

    def run(h: fsrdzv.RendezvousHandler) -> None:
        try:
            results[h.node_id] = h.next_rendezvous()
        except BaseException as exc:
            results[h.node_id] = exc

    ta = threading.Thread(target=run, args=(a,))
    ta.start()
    deadline = time.monotonic() + 10
    while not versions.raw and time.monotonic() < deadline:
        time.sleep(0.01)
    tb = threading.Thread(target=run, args=(b,))
    tb.start()
    _join_all([ta, tb], 40)
    assert a_store.lost_cas == 1 and a_store.lost_own_folds == 1
    ra, rb = results[a.node_id], results[b.node_id]
    assert isinstance(ra, fsrdzv.RendezvousInfo) and isinstance(rb, fsrdzv.RendezvousInfo), results
    assert sorted([ra.rank, rb.rank]) == [0, 1]
    states = versions.states()
    check_versions(states, 2)
    first_gen, first = states[0]
    assert a.node_id in first.participants  # the write whose reply was lost
    introduced = [g for g, s in states if s.applied.get(a.node_id) and g == first_gen]
    assert introduced == [first_gen]
    assert len({s.applied[a.node_id] for _, s in states if a.node_id in s.applied}) == 1
    for h in (a, b):
        h.shutdown()


# -- outages longer than the keep-alive timeout ----------------------------------------------------------------------


class SwitchableStore(FaultyStore):
    """FaultyStore whose ``fail_rate`` the test flips to 1.0 for an outage; ``listed`` is set by the first heartbeat
    listing after :meth:`back` (the observer's first look after its own blind spell). :meth:`hide` is an outage
    the observer cannot notice: every request fails except heartbeat listings, which keep answering the last
    listing (so the observer keeps looking, and sees nothing change)."""

    def __init__(self, inner: fsrdzv.Store) -> None:
        super().__init__(inner)
        self._armed = False
        self._hidden = False
        self.listed = threading.Event()
        #: The heartbeat tags of the last listing this store answered.
        self.last_beats: dict[str, str] = {}

    def down(self) -> None:
        self.fail_rate = 1.0

    def hide(self) -> None:
        self._hidden = True
        self.fail_rate = 1.0

    def back(self) -> None:
        self._armed = True
        self._hidden = False
        self.fail_rate = 0.0

    def list_records(self, kind: str) -> dict[str, str]:
        if kind == "hb" and self._hidden:
            return dict(self.last_beats)
        out = super().list_records(kind)
        if kind == "hb":
            self.last_beats = dict(out)
            if self._armed:
                self.listed.set()
        return out


def _read_state(name: str, rid: str) -> RendezvousState | None:
    snap = MemoryStore(name, rid).read()
    return None if snap is None else decode_state(snap.data, "test")


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not seen within {timeout}s")


@pytest.mark.parametrize(
    "reset",
    [True, False],
    ids=["liveness-reset", "control-without-reset"],
)
def test_storage_outage_longer_than_keepalive_timeout_then_back(reset: bool) -> None:
    """A and B form a round; C waits as a spare and sweeps their heartbeats. The storage becomes unreachable for
    every node (FaultyStore fail_rate=1: injected, since an outage of shared storage cannot be staged per node
    here): first for A and B, then, once C has seen their last heartbeats, for C too. C is blind for 2 s and A and
    B are silent for longer, both more than the 1.6 s keep-alive timeout. C's storage comes back first; A's and
    B's only 0.1 s after C has looked again, so their heartbeat records are still unchanged when C looks.

    ``liveness-reset``: C's liveness tracker must count only part of its own blind spell (half the timeout)
    against the others, so for the next three timeouts nobody is removed and C stays a spare. The timeout is eight
    intervals: what is left of it after the blind spell must hold A's first retried beat (up to 0.3 s after its
    storage is back) and C's next sweep, with room for a loaded machine's scheduling. The ``control-without-reset``
    run hides C's outage from it (its heartbeat listings keep answering the last one, so C sees no blind spell to
    discount) and must see the false deaths, proving the scenario exercises the reset.
    """
    rid = _rid("outage")
    name = f"outage-{uuid.uuid4().hex[:8]}"
    settings = fsrdzv.Settings(
        run_id=rid,
        min_nodes=2,
        max_nodes=2,
        join_timeout=60,
        last_call_timeout=0.3,
        keep_alive_interval=0.2,
        keep_alive_max_attempt=8,
    )
    timeout = settings.liveness_timeout
    blind = 2.0  # C's own outage: longer than the timeout, well inside the 10 s a waiting node rides out
    stores = [SwitchableStore(MemoryStore(name, rid)) for _ in range(3)]
    a, b, c = (fsrdzv.RendezvousHandler(s, settings, local_addr=f"10.0.1.{i + 1}") for i, s in enumerate(stores))
    plain = MemoryStore(name, rid)
    outcome: dict[str, Any] = {}

    def run(h: fsrdzv.RendezvousHandler) -> None:
        try:
            outcome[h.node_id] = h.next_rendezvous()
        except BaseException as exc:
            outcome[h.node_id] = exc

    threads = [threading.Thread(target=run, args=(h,)) for h in (a, b)]
    for t in threads:
        t.start()
    _join_all(threads, 30)
    spare = threading.Thread(target=run, args=(c,))
    spare.start()
    removed = False
    try:
        _wait_for(lambda: c.node_id in (_read_state(name, rid) or RendezvousState("", "")).redundancy_list, 10, "spare")
        stores[0].down()
        stores[1].down()
        silent = time.monotonic()
        time.sleep(0.05)  # a heartbeat write already past the fault check lands now
        last = plain.list_records("hb")
        # C has seen A's and B's last heartbeats (its store answered a listing with them), then goes blind too.
        _wait_for(
            lambda: all(stores[2].last_beats.get(h.node_id) == last[h.node_id] for h in (a, b)),
            timeout / 2,
            "C seeing the last heartbeats",
        )
        if reset:
            stores[2].down()
        else:
            stores[2].hide()
        time.sleep(blind)
        stores[2].back()
        assert stores[2].listed.wait(10), "C never looked at the heartbeats again"
        time.sleep(0.1)
        stores[0].back()
        stores[1].back()
        silence = time.monotonic() - silent
        stop = time.monotonic() + 3 * timeout
        while time.monotonic() < stop:
            state = _read_state(name, rid)
            assert state is not None
            if {a.node_id, b.node_id} - set(state.participants):
                removed = True
                break
            time.sleep(0.05)
        if reset:
            assert not removed, "a live node was declared dead after the observer's own outage"
            assert spare.is_alive() and c.node_id not in outcome, outcome.get(c.node_id)
            assert c.node_id in (_read_state(name, rid) or RendezvousState("", "")).redundancy_list
        else:
            assert removed, "the control run saw no false death: the test does not exercise the reset"
    finally:
        closer = fsrdzv.RendezvousHandler(MemoryStore(name, rid), settings, local_addr="10.0.1.9")
        closer.set_closed()
        spare.join(30)
        for h in (a, b, c):
            h._stop_keepalive()
    if reset:
        assert isinstance(outcome[c.node_id], fsrdzv.RendezvousGracefulExitError), outcome[c.node_id]
    print(
        f"\nobserver blind {blind:g}s, A and B silent {silence:.1f}s (keep-alive timeout {timeout:g}s): "
        f"false death {'seen' if removed else 'none'}"
    )


def test_node_cut_off_longer_than_keepalive_timeout_rejoins_when_back() -> None:
    """min=max=3. A and B wait in the forming round; A's storage is unreachable for 1.6 s (FaultyStore fail_rate=1:
    injected; only one node's path to the storage fails), twice its 0.6 s keep-alive timeout, so B rightly removes
    it. When A's storage is back and C arrives, the round {A, B, C} must form (torch's join op re-adds a node that
    finds itself in no list). Today A, B and C all time out."""
    rid = _rid("cutoff")
    name = f"cutoff-{uuid.uuid4().hex[:8]}"
    settings = fsrdzv.Settings(
        run_id=rid,
        min_nodes=3,
        max_nodes=3,
        join_timeout=6,
        last_call_timeout=0.3,
        keep_alive_interval=0.2,
        keep_alive_max_attempt=3,
    )
    stores = [SwitchableStore(MemoryStore(name, rid)) for _ in range(3)]
    handlers = [fsrdzv.RendezvousHandler(s, settings, local_addr=f"10.0.2.{i + 1}") for i, s in enumerate(stores)]
    a, b, c = handlers
    outcome: dict[str, Any] = {}

    def run(h: fsrdzv.RendezvousHandler) -> None:
        try:
            outcome[h.node_id] = h.next_rendezvous()
        except BaseException as exc:
            outcome[h.node_id] = exc

    threads = [threading.Thread(target=run, args=(h,)) for h in (a, b)]
    for t in threads:
        t.start()
    try:
        _wait_for(
            lambda: {a.node_id, b.node_id} <= set((_read_state(name, rid) or RendezvousState("", "")).participants),
            10,
            "A and B as participants",
        )
        stores[0].down()
        _wait_for(
            lambda: a.node_id not in (_read_state(name, rid) or RendezvousState("", "")).members(), 10, "A removed"
        )
        time.sleep(max(0.0, 1.6 - settings.liveness_timeout))
        stores[0].back()
        threads.append(threading.Thread(target=run, args=(c,)))
        threads[-1].start()
        _join_all(threads, 30)
    finally:
        for h in handlers:
            h._stop_keepalive()
    infos = [outcome[h.node_id] for h in handlers]
    assert all(isinstance(i, fsrdzv.RendezvousInfo) for i in infos), infos
    assert sorted(i.rank for i in infos) == [0, 1, 2]


class _OutageUntil(FaultyStore):
    """Every operation fails while ``clock() < until`` (an outage in the handler's own, virtual, time)."""

    def __init__(self, inner: fsrdzv.Store, clock: FakeClock) -> None:
        super().__init__(inner)
        self.clock = clock
        self.until = 0.0
        self.failed = 0

    def _before(self, what: str) -> None:
        if self.clock() < self.until:
            self.failed += 1
            raise TransientFault(0, f"injected outage in {what}")


def test_waiting_node_with_default_settings_survives_an_outage_longer_than_the_keepalive_timeout() -> None:
    """A node waits for a second one with torch's default timeouts, in virtual time (FakeClock, so the test takes
    a second). Its storage is unreachable for 20 s of its time (injected), longer than the 15 s keep-alive
    timeout. It must still be waiting afterwards: the join ends with the join_timeout, not with StorageError."""
    clock = FakeClock()
    rid = _rid("longout")
    store = _OutageUntil(MemoryStore(f"longout-{uuid.uuid4().hex[:8]}", rid), clock)
    settings = fsrdzv.Settings(run_id=rid, min_nodes=2, max_nodes=2, join_timeout=120)
    original = clock.sleep

    def sleep(seconds: float) -> None:
        if store.until == 0.0 and clock() > 1010.0:
            store.until = clock() + 20.0  # the outage starts 10 s into the join
        original(seconds)

    h = fsrdzv.RendezvousHandler(store, settings, local_addr="10.0.5.1", clock=clock, sleep=sleep)
    try:
        with pytest.raises(fsrdzv.RendezvousError) as info:
            h.next_rendezvous()
    finally:
        h._stop_keepalive()
    assert store.until > 0 and store.failed > 0
    assert isinstance(info.value, fsrdzv.RendezvousTimeoutError), (
        f"gave up {clock() - (store.until - 20.0):.1f}s into the outage: {info.value}"
    )


# -- real file-system faults -----------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Any) -> Iterator[Callable[[str], str]]:
    """Mount small tmpfs file systems (root only); unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[str] = []

    def mount(size: str) -> str:
        path = str(tmp_path / f"mnt{len(mounts)}")
        os.mkdir(path)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path], check=False)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", path], check=False)


def _document_bytes(run_dir: str) -> dict[str, bytes]:
    """The document on disk: ``state`` and every log entry."""
    out = {}
    for rel in ["state", *(os.path.join("log", n) for n in os.listdir(os.path.join(run_dir, "log")))]:
        with open(os.path.join(run_dir, rel), "rb") as f:
            out[rel] = f.read()
    return out


def _formed_run(endpoint: str, rid: str) -> fsrdzv.RendezvousHandler:
    """A run whose round 0 formed with one node (left running without its keep-alive: it is now 'dead')."""
    h = fsrdzv.create_handler(endpoint, rid, 1, 1, local_addr="10.0.3.1", keep_alive_interval=0.2)
    assert h.next_rendezvous().rank == 0
    h._stop_keepalive()
    return h


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_disk_full_reports_and_recovers(tmpfs: Callable[[str], str]) -> None:
    """A full tmpfs (real ENOSPC): joining fails with a one-line StorageError that says the file system is full,
    the document's bytes are unchanged, it can still be read; once space is freed the same handler joins."""
    mnt = tmpfs("256k")
    endpoint, rid = os.path.join(mnt, "rdzv"), _rid("full")
    _formed_run(endpoint, rid)
    run_dir = os.path.join(endpoint, rid)
    filler = os.path.join(mnt, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC
    before = _document_bytes(run_dir)
    h = fsrdzv.create_handler(
        endpoint, rid, 1, 1, local_addr="10.0.3.2", keep_alive_interval=0.2, join_timeout=30, sleep=_fast_sleep
    )
    with pytest.raises(fsrdzv.StorageError) as info:
        h.next_rendezvous()
    message = _one_line(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "the file system is full; free space or use another endpoint" in message
    assert run_dir in message
    assert _document_bytes(run_dir) == before
    assert fsrdzv.open_store(endpoint, rid).read() is not None
    os.unlink(filler)
    got = h.next_rendezvous()  # the dead node is swept out, round 1 forms with this one
    assert (got.round, got.rank, got.world_size) == (1, 0, 1)
    h._stop_keepalive()
    print(f"\ndisk full: {message}")


def test_disk_full_after_the_commit_point_loses_nothing(tmpfs: Callable[[str], str]) -> None:
    """A tmpfs with exactly one free page (real ENOSPC): the CAS commits its log entry (link(2)) and then cannot
    write the published copy of ``state``. The new generation is nevertheless the document (readers roll forward
    through the log), nothing is lost or doubled, and the next CAS on its token wins once space is back."""
    mnt = tmpfs("128k")
    store = fsrdzv.open_store(os.path.join(mnt, "rdzv"), "enospc")
    first = store.compare_and_set(b"a" * 1000, None).snapshot
    assert first is not None
    stat = os.statvfs(mnt)
    filler = os.path.join(mnt, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - stat.f_frsize))
    assert store.compare_and_set(b"b" * 1000, first.token).won  # committed: publishing `state` is only a shortcut
    after = store.read()
    assert after is not None and after.generation == 2 and after.data == b"b" * 1000
    os.unlink(filler)
    third = store.compare_and_set(b"c" * 1000, after.token)
    assert third.won and third.snapshot is not None and third.snapshot.generation == 3
    assert not store.compare_and_set(b"d", first.token).won


def test_cas_that_committed_reports_won_even_if_publishing_state_fails(tmpfs: Callable[[str], str]) -> None:
    """Same one-free-page tmpfs as above: the CAS whose log entry was committed should return ``won=True``."""
    mnt = tmpfs("128k")
    store = fsrdzv.open_store(os.path.join(mnt, "rdzv"), "enospc")
    first = store.compare_and_set(b"a" * 1000, None).snapshot
    assert first is not None
    stat = os.statvfs(mnt)
    with open(os.path.join(mnt, "filler"), "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - stat.f_frsize))
    result = store.compare_and_set(b"b" * 1000, first.token)
    assert result.won and result.snapshot is not None and result.snapshot.generation == 2


def test_read_only_file_system(tmpfs: Callable[[str], str]) -> None:
    """The endpoint's file system is remounted read-only (real EROFS): joining fails with a one-line StorageError
    that says so, the document's bytes are unchanged and it can still be read (status keeps working)."""
    mnt = tmpfs("1m")
    endpoint, rid = os.path.join(mnt, "rdzv"), _rid("ro")
    _formed_run(endpoint, rid)
    run_dir = os.path.join(endpoint, rid)
    before = _document_bytes(run_dir)
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    try:
        h = fsrdzv.create_handler(endpoint, rid, 1, 1, local_addr="10.0.3.2", join_timeout=30, sleep=_fast_sleep)
        with pytest.raises(fsrdzv.StorageError) as info:
            h.next_rendezvous()
        message = _one_line(info.value)
        assert info.value.errno == errno.EROFS
        assert "the file system is mounted read-only; use a writable shared directory" in message
        assert _document_bytes(run_dir) == before
        snap = fsrdzv.open_store(endpoint, rid).read()
        assert snap is not None and decode_state(snap.data, "t").complete
    finally:
        subprocess.run(["mount", "-o", "remount,rw", mnt], check=False)
    print(f"\nread-only: {message}")


_AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
_AS_OTHER_USER = r"""
import json, sys, time
import fsrdzv
endpoint, rid = sys.argv[1], sys.argv[2]
out = {}
try:
    fsrdzv.open_store(endpoint, rid).read()
    out["read"] = None
except fsrdzv.RendezvousError as exc:
    out["read"] = [type(exc).__name__, exc.errno, str(exc)]
h = fsrdzv.create_handler(endpoint, rid, 1, 1, join_timeout=30, sleep=lambda s: time.sleep(min(s, 0.01)))
try:
    h.next_rendezvous()
    out["join"] = None
except fsrdzv.RendezvousError as exc:
    out["join"] = [type(exc).__name__, getattr(exc, "errno", None), str(exc)]
print(json.dumps(out))
"""


def test_permission_denied_for_another_user() -> None:
    """A run created by root with the default owner-only modes (0700/0600); a process running as nobody (setpriv:
    real EACCES) can neither read nor join. Both fail with a one-line StorageError naming the path and saying to
    check owner and mode; the document's bytes are unchanged."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a process as another user")
    base = tempfile.mkdtemp(prefix="fsrdzv-perm-")
    try:
        os.chmod(base, 0o755)
        endpoint, rid = os.path.join(base, "rdzv"), _rid("perm")
        _formed_run(endpoint, rid)
        run_dir = os.path.join(endpoint, rid)
        assert os.stat(endpoint).st_mode & 0o777 == 0o700
        before = _document_bytes(run_dir)
        done = subprocess.run(
            [*_AS_NOBODY, sys.executable, "-c", _AS_OTHER_USER, endpoint, rid],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            check=False,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        for op in ("read", "join"):
            assert out[op] is not None, f"{op} as nobody succeeded"
            kind, code, message = out[op]
            assert kind == "StorageError" and code == errno.EACCES, out[op]
            assert "\n" not in message and run_dir in message
            assert "Permission denied; check the directory's owner and mode" in message
            assert message.lower().count("permission denied") == 1, message
        assert _document_bytes(run_dir) == before
        print(f"\npermission denied: {out['join'][2]}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_missing_directory_says_the_shared_file_system_may_not_be_mounted(tmp_path: Any) -> None:
    """The endpoint's parent does not exist (an unmounted shared file system): joining fails with a one-line
    StorageError asking whether the shared file system is mounted, and creates nothing (no silent local run).
    This test keeps the handler's real retry back-off and prints how long a user waits for the error."""
    endpoint = str(tmp_path / "not-mounted" / "rdzv")
    h = fsrdzv.create_handler(endpoint, _rid("missing"), 1, 1, join_timeout=60)
    started = time.monotonic()
    with pytest.raises(fsrdzv.StorageError) as info:
        h.next_rendezvous()
    waited = time.monotonic() - started
    message = _one_line(info.value)
    assert info.value.errno == errno.ENOENT
    assert "is the shared file system mounted on this node?" in message
    assert endpoint in message
    assert not os.path.exists(tmp_path / "not-mounted")
    print(f"\nmissing directory, reported after {waited:.1f}s of retries: {message}")


# -- randomized soak -------------------------------------------------------------------------------------------------


def test_soak_6_handler_threads_random_joins_leaves_deaths_one_close() -> None:
    """6 node slots (threads) run real handlers on one memory store for ~12 s: after each round a node holds for a
    random time and then re-joins (leave + join), or dies (its keep-alive stops, no shutdown) and comes back as a new
    node, or stays until it sees waiting nodes, as agents do. Then one close. Every committed document version is
    checked: a node in one list at most, dense unique ranks per completed round that never change, generation
    and round only grow, closed stays closed; every rank a handler returned matches the document of its round;
    no join times out."""
    duration = 12.0
    versions = Versions()
    name = f"soak-{uuid.uuid4().hex[:8]}"
    rid = _rid("soak")
    max_nodes = 4
    settings = fsrdzv.Settings(
        run_id=rid,
        min_nodes=2,
        max_nodes=max_nodes,
        join_timeout=20,
        last_call_timeout=0.3,
        keep_alive_interval=0.2,
        keep_alive_max_attempt=5,
    )
    stop = threading.Event()
    lock = threading.Lock()
    results: list[tuple[str, fsrdzv.RendezvousInfo]] = []
    counts: Counter[str] = Counter()
    errors: list[BaseException] = []
    live: dict[int, fsrdzv.RendezvousHandler] = {}

    def new_handler(slot: int, incarnation: int) -> fsrdzv.RendezvousHandler:
        h = fsrdzv.RendezvousHandler(
            RecordingMemoryStore(name, rid, versions), settings, local_addr=f"10.1.{slot}.{incarnation % 250 + 1}"
        )
        with lock:
            live[slot] = h
        return h

    def slot(i: int) -> None:
        rng = random.Random(7919 * i)
        incarnation = 0
        h = new_handler(i, incarnation)
        counts["nodes"] += 1
        try:
            while True:
                try:
                    counts["joins"] += 1
                    info = h.next_rendezvous()
                except (fsrdzv.RendezvousClosedError, fsrdzv.RendezvousGracefulExitError):
                    counts["saw_close"] += 1
                    return
                with lock:
                    results.append((h.node_id, info))
                hold = time.monotonic() + rng.uniform(0, 1.0)
                while time.monotonic() < hold and not h.num_nodes_waiting():
                    time.sleep(0.05)
                if stop.is_set():
                    continue  # join again: it sees the close
                action = rng.random()
                if action < 0.2:
                    counts["deaths"] += 1
                    h._stop_keepalive()  # dies: no shutdown, its records stay behind
                    time.sleep(rng.uniform(0, 0.5))
                    if stop.is_set():
                        return
                    incarnation += 1
                    h = new_handler(i, incarnation)
                    counts["nodes"] += 1
                else:
                    counts["leaves"] += 1  # next_rendezvous again leaves the round and joins the next
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=slot, args=(i,), name=f"slot-{i}") for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    closer = fsrdzv.RendezvousHandler(RecordingMemoryStore(name, rid, versions), settings, local_addr="10.1.9.9")
    closer.set_closed()
    counts["closes"] += 1
    try:
        _join_all(threads, 60)
    finally:
        with lock:
            for h in live.values():
                h._stop_keepalive()
    assert not errors, errors
    states = versions.states()
    checked = check_versions(states, max_nodes)
    assert checked["closed"] == 1 and states[-1][1].closed
    assert len({s.epoch for _, s in states}) == 1, "the run restarted"
    by_round: dict[int, tuple[dict[str, int], tuple[str, ...]]] = {}
    for _, state in states:
        if state.complete and state.round not in by_round:
            by_round[state.round] = (dict(state.participants), tuple(state.roster))
    per_round: dict[int, list[int]] = {}
    for node_id, info in results:
        ranks, roster = by_round[info.round]
        assert ranks[node_id] == info.rank, (node_id, info)
        assert info.world_size == len(roster) and info.participants == roster
        per_round.setdefault(info.round, []).append(info.rank)
    for ranks_seen in per_round.values():
        assert len(ranks_seen) == len(set(ranks_seen)), per_round
    assert checked["completed_rounds"] >= 5, checked
    assert counts["deaths"] >= 1 and counts["leaves"] >= 1
    print(
        f"\nsoak {time.monotonic() - started:.1f}s: {checked['versions']} document versions checked, "
        f"{checked['completed_rounds']} rounds completed, {len(results)} ranks handed out, {counts['nodes']} nodes, "
        f"{counts['joins']} joins, {counts['leaves']} leaves, {counts['deaths']} deaths, {counts['closes']} close "
        f"(seen by {counts['saw_close']} threads)"
    )


def test_an_outage_logs_the_keepalive_failure_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    """The keep-alive retries a failed beat every ~0.1 s here; during a 2 s outage it warns once, not each time."""
    rid = _rid("quiet")
    store = FaultyStore(MemoryStore(f"quiet-{uuid.uuid4().hex[:8]}", rid))
    settings = fsrdzv.Settings(run_id=rid, min_nodes=1, max_nodes=1, keep_alive_interval=0.1, last_call_timeout=0.1)
    h = fsrdzv.RendezvousHandler(store, settings, local_addr="10.0.7.1")
    h.next_rendezvous()
    try:
        with caplog.at_level("WARNING", logger="fsrdzv"):
            store.fail_rate = 1.0
            time.sleep(2.0)
            store.fail_rate = 0.0
    finally:
        h.shutdown()
    warnings = [r for r in caplog.records if "keep-alive of" in r.getMessage()]
    assert store.injected >= 5
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
