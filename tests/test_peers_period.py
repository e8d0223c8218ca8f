"""How often the ring watch looks at its peers (``PeerWatch.period``), on a virtual clock over a memory store: once
per keep-alive interval by record tags (no bodies), and a peer whose record stopped changing is found dead one
liveness timeout after its last beat as the watch estimates it, not up to a period later."""

from __future__ import annotations

import uuid

from fsrdzv import open_store
from fsrdzv._admin import RunAdmin
from fsrdzv._model import NodeInfo, RendezvousState
from fsrdzv._peers import PeerWatch
from fsrdzv._settings import Settings
from fsrdzv._state import encode_state

INTERVAL = 5.0
ATTEMPTS = 3


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _round(run_id: str) -> RendezvousState:
    nodes = {n: NodeInfo(f"10.0.0.{i + 1}", 42, 0, f"n{i}", 29500, n) for i, n in enumerate("abc")}
    ids = {n: info.node_id for n, info in nodes.items()}
    return RendezvousState(
        run_id=run_id,
        epoch="e0",
        generation=3,
        complete=True,
        participants={ids[n]: i for i, n in enumerate("abc")},
        nodes={info.node_id: info for info in nodes.values()},
        master=("10.0.0.1", 29500),
    )


def test_the_watch_looks_once_per_interval_and_finds_a_dead_peer_on_time() -> None:
    run_id = f"period-{uuid.uuid4().hex[:6]}"
    store = open_store(f"memory://{run_id}", run_id)
    state = _round(run_id)
    assert store.compare_and_set(encode_state(state), None).won
    me, quiet, alive = sorted(state.participants, key=lambda n: state.participants[n])
    settings = Settings(run_id, 1, 3, keep_alive_interval=INTERVAL, keep_alive_max_attempt=ATTEMPTS)
    clock = Clock()
    admin = RunAdmin(store, settings, clock=clock)
    watch = PeerWatch(admin, settings, me, clock)
    beats = 0

    def beat(node: str) -> None:
        nonlocal beats
        beats += 1
        store.put_record("hb", node, b'{"n":%d}' % beats)

    beat(quiet)
    beat(alive)
    watch.start(state)
    last_quiet_beat = clock.now
    looked_at: list[float] = []
    found = None
    for step in range(1, 600):  # 60 s of torchrun's agent asking every 0.1 s
        clock.now = 100.0 + step * 0.1
        if step % 50 == 0:
            beat(alive)
            if clock.now < 108:
                beat(quiet)
                last_quiet_beat = clock.now
        tags = admin.session.ops["tag"]
        lost = watch.lost(state)
        if admin.session.ops["tag"] > tags:
            looked_at.append(clock.now)
        if lost:
            found = clock.now
            break
    assert found is not None
    timeout = INTERVAL * ATTEMPTS
    saw_last_beat = min(t for t in looked_at if t >= last_quiet_beat)
    assert saw_last_beat <= last_quiet_beat + INTERVAL
    # Dead one timeout after its last beat as the watch estimates it (the middle of the gap before the look that saw
    # it, at most half an interval: the handler's fresh-observer rule), to the agent's next call, not up to a period
    # later; and never before timeout - interval / 2 of real silence.
    assert saw_last_beat + timeout - INTERVAL / 2 <= found <= saw_last_beat + timeout + 0.11
    assert found >= last_quiet_beat + timeout - INTERVAL / 2
    looks = admin.session.ops["tag"] / 2
    assert (found - 100.0) / INTERVAL <= looks <= (found - 100.0) / (0.8 * INTERVAL) + 2
    assert admin.session.ops["get"] == 0
