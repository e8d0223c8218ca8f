"""A rendezvous node in its own process, driven like torchrun's agent, reporting events as JSON lines.

Usage: python tests/rdzv_node.py ENDPOINT RUN_ID MIN MAX [options]; options are in ``main``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import fsrdzv


def emit(**event: object) -> None:
    event["t"] = time.time()
    event["pid"] = os.getpid()
    print(json.dumps(event), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("endpoint")
    p.add_argument("run_id")
    p.add_argument("min", type=int)
    p.add_argument("max", type=int)
    p.add_argument("--addr", default="127.0.0.1")
    p.add_argument("--rounds", type=int, default=1, help="stop after this many completed rounds")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to stay in each round unless nodes wait")
    p.add_argument("--shutdown", action="store_true", help="call shutdown() (closes the run) at the end")
    p.add_argument("--stop-file", default="", help="end the hold as soon as this file exists")
    p.add_argument("--clock-offset", type=float, default=0.0, help="skew this node's clock by that many seconds")
    p.add_argument("--options", default="{}", help="JSON storage options")
    p.add_argument("--settings", default="{}", help="JSON keyword arguments for create_handler")
    args = p.parse_args()
    handler = fsrdzv.create_handler(
        args.endpoint,
        args.run_id,
        args.min,
        args.max,
        local_addr=args.addr,
        storage_options=json.loads(args.options),
        clock=lambda: time.monotonic() + args.clock_offset,
        **json.loads(args.settings),
    )
    emit(event="start", node=handler.node_id)
    code = 0
    try:
        for _ in range(args.rounds):
            emit(event="joining")
            info = handler.next_rendezvous()
            emit(
                event="rank",
                round=info.round,
                rank=info.rank,
                world_size=info.world_size,
                master=[info.master_addr, info.master_port],
                participants=list(info.participants),
                ops=handler.ops,
            )
            stop = time.monotonic() + args.hold
            while time.monotonic() < stop and not (args.stop_file and os.path.exists(args.stop_file)):
                waiting = handler.num_nodes_waiting()
                if waiting:
                    emit(event="waiting", count=waiting)
                    break
                time.sleep(0.05)
    except fsrdzv.RendezvousGracefulExitError as exc:
        emit(event="graceful", message=str(exc))
    except fsrdzv.RendezvousClosedError as exc:
        emit(event="closed", message=str(exc))
        code = 10
    except fsrdzv.RendezvousTimeoutError as exc:
        emit(event="timeout", message=str(exc))
        code = 11
    if args.shutdown:
        emit(event="shutdown", ok=handler.shutdown())
    emit(event="exit", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
