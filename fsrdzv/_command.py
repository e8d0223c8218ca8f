"""The launcher's command: a process group of its own that dies with the launcher and is stopped as a whole.

On Linux the command gets ``PR_SET_PDEATHSIG = SIGKILL`` through a tiny exec shim, so that a launcher killed with
SIGKILL (a node "dying" in tests, an OOM kill) never leaves its command running alone. The death signal follows
the thread that started the child: :meth:`fsrdzv._launcher.Launcher.run` must run on the thread that lives
longest (the main one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = ["exit_status", "kill_group", "spawn", "stop_group"]

log = logging.getLogger("fsrdzv.run")

#: Runs between fork and the command's exec on Linux: ask the kernel to SIGKILL the command when the launcher dies,
#: then exec. If the launcher already died before prctl took effect, exit instead of running orphaned.
_PDEATHSIG_SHIM: Final = (
    "import ctypes,os,sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(137)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "    sys.stderr.write('fsrdzv run: cannot execute %r: %s\\n' % (sys.argv[2], e.strerror))\n"
    "    sys.exit(127)\n"
)


def exit_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell exit status: a death by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def spawn(cmd: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session, with the death signal shim on Linux.

    A new session: the command and everything it starts form one process group that we can stop as a whole, and
    a Ctrl-C on the terminal reaches only the launcher, which forwards it exactly once.
    """
    argv = list(cmd)
    if sys.platform == "linux":
        argv = [sys.executable, "-I", "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]
    return subprocess.Popen(argv, env=dict(env), start_new_session=True)


def kill_group(child: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


def stop_group(child: subprocess.Popen[bytes], timeout: float, why: str) -> None:
    """Stop the command's whole process group: SIGTERM, then SIGKILL after ``timeout``."""
    if child.poll() is None:
        log.info("stopping the command (pid %d): %s", child.pid, why)
        kill_group(child, signal.SIGTERM)
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("the command ignored SIGTERM for %.1fs: SIGKILL", timeout)
            kill_group(child, signal.SIGKILL)
            child.wait()
    # Whatever the command left behind in its group (background helpers) must not outlive the round.
    kill_group(child, signal.SIGKILL)
