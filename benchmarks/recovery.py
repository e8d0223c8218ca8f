"""Recovery after a node dies: fsrdzv against torch's c10d backend, in the same run.

    .venv/bin/python benchmarks/recovery.py [--repeat 3] [--systems fsrdzv-dir torch-c10d]

Four node processes (min 2, max 4, every other setting at its default: keep-alive 5 s x 3, last call 30 s) form
round 0. 5-15 s later (drawn per repetition, the same for both systems) one of them is SIGKILLed, and the three
survivors call ``next_rendezvous()`` at once, as torchrun's agents do when their workers fail. Measured: seconds
from the kill until every survivor holds its rank in the next round. fsrdzv runs on a local directory; torch on
its c10d backend with a TCPStore that the driver hosts (so the killed node never takes the store with it).
Systems alternate within each repetition.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _common import machine_note, markdown_table, section, write_result  # noqa: E402

NODES = 4
#: The kill comes this long after round 0 formed (s), drawn per repetition and the same for every system: the
#: dead node's last heartbeat is then any part of a keep-alive interval old, as in a job that trains for a while.
SETTLE = (5.0, 15.0)

_NODE = textwrap.dedent(
    """
    import sys, time
    system, endpoint, run_id, index = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    addr = f"127.0.0.{index + 1}"
    if system == "fsrdzv-dir":
        import fsrdzv
        handler = fsrdzv.create_handler(endpoint, run_id, 2, 4, local_addr=addr)
    else:
        from torch.distributed.elastic.rendezvous import RendezvousParameters
        from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as c10d
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
        params = RendezvousParameters(
            "c10d", endpoint, run_id, 2, 4, local_addr=addr, is_host=False, read_timeout=120
        )
        backend, store = c10d.create_backend(params)
        handler = create_handler(store, backend, params)
    while True:
        info = handler.next_rendezvous()
        rank = getattr(info, "rank", None)
        if rank is None:
            rank = info.rank  # torch's RendezvousInfo
        print("round", getattr(info, "round", -1), rank, getattr(info, "world_size", -1), time.time(), flush=True)
        if sys.stdin.readline().strip() != "rejoin":
            break
    """
)


def _trial(system: str, workdir: str, settle: float) -> dict[str, float]:
    run_id = f"recovery-{uuid.uuid4().hex[:8]}"
    store = None
    if system == "fsrdzv-dir":
        endpoint = workdir
    else:
        import torch.distributed as dist

        sock_port = _free_port()
        store = dist.TCPStore("127.0.0.1", sock_port, is_master=True, wait_for_workers=False)
        endpoint = f"127.0.0.1:{sock_port}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NODE, system, endpoint, run_id, str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i in range(NODES)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if not p.stdout.readline().startswith("round"):
                raise RuntimeError(f"{system}: a node did not form round 0")
        time.sleep(settle)
        victim, survivors = procs[-1], procs[:-1]
        killed = time.time()
        victim.kill()
        for p in survivors:
            assert p.stdin is not None
            p.stdin.write("rejoin\n")
            p.stdin.flush()
        formed = []
        for p in survivors:
            assert p.stdout is not None
            line = p.stdout.readline().split()
            if not line or line[0] != "round":
                raise RuntimeError(f"{system}: a survivor did not form the next round: {line}")
            formed.append(float(line[4]))
        return {"recovery": max(formed) - killed}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        del store


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--systems", nargs="+", default=["fsrdzv-dir", "torch-c10d"])
    parser.add_argument("--out", default="recovery.md")
    parser.add_argument("--no-files", action="store_true")
    args = parser.parse_args()
    times: dict[str, list[float]] = {s: [] for s in args.systems}
    with tempfile.TemporaryDirectory(prefix="fsrdzv-recovery-", dir="/var/tmp") as workdir:
        for rep in range(args.repeat):
            settle = random.Random(rep).uniform(*SETTLE)
            for system in args.systems:
                got = _trial(system, os.path.join(workdir, f"{system}-{rep}"), settle)
                times[system].append(got["recovery"])
                print(f"{system} repetition {rep + 1}: {got['recovery']:.1f} s", flush=True)
    base = statistics.median(times["torch-c10d"]) if times.get("torch-c10d") else None
    rows = []
    for system, values in times.items():
        med = statistics.median(values)
        ratio = f"{med / base:.2f}" if base else "-"
        rows.append([system, f"{med:.1f} s", f"{min(values):.1f}-{max(values):.1f} s", ratio, len(values)])
    command = "python benchmarks/recovery.py " + " ".join(sys.argv[1:])
    text = (
        "# Recovery: 4 nodes (min 2, max 4, defaults), one SIGKILLed, until the 3 survivors hold ranks\n\n"
        f"{section('command', '`' + command.strip() + '`')}\n\n"
        f"{section('table', markdown_table(['system', 'median', 'min-max', 'vs torch c10d', 'repetitions'], rows))}"
        f"\n\nMachine: {section('machine', machine_note())}\n"
    )
    print(text)
    if not args.no_files:
        print(f"wrote {write_result(args.out, text)}")


if __name__ == "__main__":
    main()
