"""The training script of the torchrun end-to-end tests: a gloo all-reduce whose sum every worker checks.

Each worker writes ``<out>/a<restart>-w<world>-r<rank>.json`` after its first all-reduce, so that a test can see
which world it reached and what the agent handed it (MASTER_ADDR/PORT, group rank, agent store). Then it either
finishes or *holds*, all-reducing every ``--interval`` seconds:

* ``--world W``: finish only in a world of W workers; any other world holds until the agent stops it (scale-up
  restart) or a peer dies (the next all-reduce fails, which is what a node failure test needs);
* ``--hold FILE``: also hold until FILE exists (the test releases the workers when it has seen what it wanted);
* ``--safe-point-file FILE``: while holding, call ``fsrdzv.safe_point()`` at every step once FILE exists.

A worker that holds longer than ``--max-wait`` seconds exits with status 3, so a broken test fails instead of
hanging. Exit status 2 means a wrong all-reduce sum.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fsrdzv


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", type=int, default=0, help="finish only in a world of this many workers")
    parser.add_argument("--hold", default="", help="also hold until this file exists")
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--max-wait", type=float, default=150.0)
    parser.add_argument("--safe-point-file", default="", help="mark safe points once this file exists")
    args = parser.parse_args()

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # A short collective timeout: a dead peer must fail the worker quickly, not after gloo's 30 minutes.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))

    def check() -> bool:
        tensor = torch.tensor([float(rank + 1)])
        dist.all_reduce(tensor)
        return float(tensor.item()) == world * (world + 1) / 2

    ok = check()
    record = {
        "rank": rank,
        "world": world,
        "restart": restart,
        "ok": ok,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "group_world": int(os.environ["GROUP_WORLD_SIZE"]),
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        "agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE"),
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "pid": os.getpid(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".a{restart}-w{world}-r{rank}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.rename(out / f"a{restart}-w{world}-r{rank}.json")
    print(f"worker rank={rank} world={world} restart={restart} sum_ok={ok} master={record['master']}", flush=True)
    if not ok:
        return 2

    start = time.monotonic()
    while (args.world and world != args.world) or (args.hold and not os.path.exists(args.hold)):
        if time.monotonic() - start > args.max_wait:
            print(f"worker rank={rank} held for more than {args.max_wait}s; giving up", flush=True)
            return 3
        time.sleep(args.interval)
        if not check():
            return 2
        if args.safe_point_file and os.path.exists(args.safe_point_file) and fsrdzv.safe_point():
            print(f"worker rank={rank} marked a safe point", flush=True)

    dist.barrier()
    dist.destroy_process_group()
    print(f"worker rank={rank} world={world} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
