"""A fork server of counter writers for the SIGKILL-mid-CAS test (tests/test_crash.py).

Usage: ``python tests/crash_writer.py ENDPOINT RUN_ID [--no-lock]``

The server imports fsrdzv once, prints ``ready`` and then reads commands from stdin, one per line:

``go``          fork a writer child and print ``child <pid>``. The child opens its own store and increments the
                counter document (its payload is the decimal count) with read + compare-and-set as fast as it can.
                Before each CAS it prints ``try <value>`` and after a CAS that won ``won <value>``.
``reap <pid>``  wait for that child (the test has SIGKILLed it) and print ``reaped <pid> <signal>``.
``quit``        exit.

Forking a single-threaded server costs milliseconds where starting Python costs 0.2 s, so 100 kills take seconds.
The child writes each line with one ``write(2)`` on the inherited pipe (atomic below PIPE_BUF), so a kill never
leaves half a line and the test can account for every increment: ``won`` lines are confirmed increments; a
``try`` without its ``won`` is an increment in flight when the kill came, which may or may not have committed.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import fsrdzv


def _say(text: str) -> None:
    os.write(1, (text + "\n").encode())


def _writer(endpoint: str, run_id: str, options: dict[str, object]) -> None:  # pragma: no cover - child
    store = fsrdzv.open_store(endpoint, run_id, storage_options=options)
    _say(f"start {os.getpid()}")
    while True:
        snap = store.read()
        value = int(snap.data) if snap is not None else 0
        _say(f"try {value + 1}")
        result = store.compare_and_set(str(value + 1).encode(), None if snap is None else snap.token)
        if result.won:
            _say(f"won {value + 1}")


def main() -> int:
    endpoint, run_id = sys.argv[1], sys.argv[2]
    options: dict[str, object] = {"lock": False} if "--no-lock" in sys.argv[3:] else {}
    _say("ready")
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "go":
            # The child waits until "child <pid>" is out, so its own lines always come after that one.
            gate_r, gate_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    os.close(gate_w)
                    os.read(gate_r, 1)
                    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                    _writer(endpoint, run_id, options)
                finally:
                    os._exit(3)
            os.close(gate_r)
            _say(f"child {pid}")
            os.write(gate_w, b"x")
            os.close(gate_w)
        elif command == "reap":
            _, status = os.waitpid(int(arg), 0)
            _say(f"reaped {arg} {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)}")
        elif command == "quit":
            break
        else:
            _say(json.dumps({"error": f"unknown command {line.strip()!r}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
