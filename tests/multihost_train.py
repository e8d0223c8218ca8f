"""The multi-host tests' torchrun agent wrapper and training script (tests/test_multihost.py), in one file.

``python multihost_train.py agent TORCHRUN_ARGS...`` runs torchrun (``torch.distributed.run.main``) and records
what fsrdzv hands the agent in every round: the wrapper wraps the core handler that ``FsRendezvousHandler`` is
built on (its first argument) and, after each ``next_rendezvous``, appends one JSON line (``kind: "agent"``: host,
round, rank, world, master address and port, participants) to ``$MH_OUT/agent-<host>-<pid>.jsonl`` and exports
``MH_ROUND`` so the workers it starts next know their round.

``python multihost_train.py worker [--steps N] [--hold FILE] ...`` is a gloo worker: it all-reduces ``rank + 1``
every ``--interval`` seconds and appends one JSON line per step (``kind: "step"``: host, round, rank, world,
MASTER_ADDR/PORT and what that name resolves to here, sum correct or not) to ``$MH_OUT/worker-<host>-<pid>.jsonl``.
It finishes after ``--steps`` steps once ``--hold`` exists (if given); with ``--idle`` it stops all-reducing
after ``--steps`` steps while it waits for ``--hold`` (so that only its agent can notice that a peer is gone). A
wrong sum exits 2, holding longer than ``--max-wait`` exits 3. A peer that dies makes the next all-reduce fail
(the agent then restarts the workers).

Both read ``MH_HOST``/``MH_ADDR`` (set by tests/hosts.py) and ``MH_OUT`` from the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


def _append(kind: str, record: dict[str, Any]) -> None:
    out = Path(os.environ["MH_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "host": os.environ.get("MH_HOST"), "addr": os.environ.get("MH_ADDR"), **record}
    record.update({"pid": os.getpid(), "t": time.time()})
    with open(out / f"{kind}-{record['host']}-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


class _Recording:
    """Delegates to fsrdzv's core handler and records each round it hands out."""

    def __init__(self, core: Any) -> None:
        self._core = core

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def next_rendezvous(self) -> Any:
        info = self._core.next_rendezvous()
        os.environ["MH_ROUND"] = str(info.round)
        _append(
            "agent",
            {
                "round": info.round,
                "rank": info.rank,
                "world": info.world_size,
                "master_addr": info.master_addr,
                "master_port": info.master_port,
                "participants": list(info.participants),
            },
        )
        return info


def agent(argv: list[str]) -> None:
    from torch.distributed.run import main

    from fsrdzv.torchrun import FsRendezvousHandler

    original = FsRendezvousHandler.__init__

    def init(self: FsRendezvousHandler, core: Any, *args: Any, **kwargs: Any) -> None:
        original(self, _Recording(core), *args, **kwargs)

    FsRendezvousHandler.__init__ = init  # type: ignore[method-assign]
    main(argv)


def worker(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hold", default="", help="keep stepping until this file exists")
    parser.add_argument("--idle", action="store_true", help="after --steps, wait for --hold without all-reducing")
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=60.0, help="gloo's collective timeout")
    parser.add_argument("--max-wait", type=float, default=150.0)
    args = parser.parse_args(argv)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    master_addr, master_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    resolved = None
    with contextlib.suppress(OSError):
        resolved = socket.gethostbyname(master_addr)
    common = {
        "round": int(os.environ.get("MH_ROUND", "-1")),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "rank": rank,
        "world": world,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "master_addr": master_addr,
        "master_port": master_port,
        "master_resolved": resolved,
    }
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    start = time.monotonic()
    step = 0
    while True:
        # Idle: no collective, so nothing in the worker notices a dead or removed peer; only its agent can.
        if not (args.idle and step >= args.steps):
            tensor = torch.tensor([float(rank + 1)])
            dist.all_reduce(tensor)
            ok = float(tensor.item()) == world * (world + 1) / 2
            _append("worker", {**common, "step": step, "ok": ok, "sum": float(tensor.item())})
            if not ok:
                return 2
            step += 1
        if step >= args.steps and (not args.hold or os.path.exists(args.hold)):
            break
        if time.monotonic() - start > args.max_wait:
            print(f"worker rank={rank} held for more than {args.max_wait}s; giving up", flush=True)
            return 3
        time.sleep(args.interval)
    dist.barrier()
    dist.destroy_process_group()
    _append("worker", {**common, "step": step, "done": True})
    return 0


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "agent":
        agent(rest)
    elif mode == "worker":
        sys.exit(worker(rest))
    else:
        sys.exit(f"usage: {sys.argv[0]} agent TORCHRUN_ARGS... | worker [--steps N] [--hold FILE]")
