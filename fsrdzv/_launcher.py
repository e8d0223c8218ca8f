"""The elastic launcher behind ``fsrdzv run``: any program, torch's agent loop, fsrdzv's rendezvous.

One launcher runs on every node. It loops:

1. **Join** the next round (:meth:`RendezvousHandler.next_rendezvous`; the handler heartbeats on its own thread
   from then on, also while the program runs).
2. **Run** ``nproc_per_node`` copies of the command, each in a new process group with torchrun's worker
   environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_*``...;
   see :mod:`fsrdzv._workers`) and fsrdzv's ``FSRDZV_*``. One failed copy stops the others, as in torchrun.
3. **Monitor**, every ``monitor_interval``: one read of the document and the heartbeats of a few peers in a
   ring (:class:`fsrdzv._roundcheck.RoundCheck`); a dead peer is removed with its records.
4. On a **membership change** it stops the command (SIGTERM to the whole group, SIGKILL after ``stop_timeout``)
   and goes back to 1. This is free, as in torch. A **failed** command also goes back to 1 and uses one of the
   ``max_restarts``. A command that **succeeds** closes the run, so the other nodes stop when their own command
   ends. A final failure closes the run too (torch does the same: the job failed).

Signals: SIGTERM and SIGINT are forwarded to the command's process group; the launcher then exits with the
command's status and leaves the run open, so that the remaining nodes can re-form (torch's agent does not close
the rendezvous on a signal either). A signal while no command runs ends the launcher at once (128 + signal).

Peers are watched in a ring (each node reads the heartbeat records of the ``watch_peers`` next ranks), so the
monitoring costs O(1) reads per node instead of O(N). Some live node always watches the first of any set of dead
nodes, and a death it sees makes every node re-form, after which the handlers' own sweeps remove the rest.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

from ._errors import RendezvousClosedError, RendezvousGracefulExitError, StorageError
from ._handler import RendezvousHandler, RendezvousInfo, create_handler
from ._roundcheck import RoundCheck
from ._scaleup import DEFAULT_MAX_DELAY
from ._settings import LAUNCH_DEFAULTS, Settings
from ._workers import WorkerGroup, WorkerSetup, worker_env

__all__ = ["LaunchConfig", "Launcher"]

log = logging.getLogger("fsrdzv.run")

#: How often the launcher wakes up to poll the command and pending signals (s); the storage checks run every
#: ``monitor_interval`` on top of that.
TICK: Final = 0.05


@dataclass(frozen=True)
class LaunchConfig:
    """Everything ``fsrdzv run`` needs. Times are seconds; see ``fsrdzv run --help`` for each."""

    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    cmd: Sequence[str]
    max_restarts: int = 0
    local_addr: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    secret: bytes | None = None
    join_timeout: float = Settings.join_timeout
    last_call_timeout: float = Settings.last_call_timeout
    close_timeout: float = Settings.close_timeout
    keep_alive_interval: float = Settings.keep_alive_interval
    keep_alive_max_attempt: int = Settings.keep_alive_max_attempt
    heartbeat_timeout: float = Settings.heartbeat_timeout
    monitor_interval: float = float(LAUNCH_DEFAULTS["monitor_interval"])
    stop_timeout: float = float(LAUNCH_DEFAULTS["stop_timeout"])
    watch_peers: int = int(LAUNCH_DEFAULTS["watch_peers"])
    nproc_per_node: int = 1
    scale_up_at: str = "any_time"
    scale_up_max_delay: float = DEFAULT_MAX_DELAY
    #: Where the job secret came from (exported to the workers as a path, never as the secret).
    secret_file: str | None = None
    #: Host names the job expects (``--expect``; empty: the environment's ``SLURM_JOB_NODELIST``, if any).
    expected_nodes: Sequence[str] = ()


class _Interrupted(Exception):
    """A SIGTERM/SIGINT arrived while no command was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class _Outcome:
    kind: str  # "exited" (the command ended on its own), "signalled" (after a forwarded signal), "membership"
    code: int = 0
    reason: str = ""


def handler_for(config: LaunchConfig) -> RendezvousHandler:
    """This node's handler for ``config``."""
    return create_handler(
        config.endpoint,
        config.run_id,
        config.min_nodes,
        config.max_nodes,
        local_addr=config.local_addr,
        storage_options=dict(config.storage_options),
        join_timeout=config.join_timeout,
        last_call_timeout=config.last_call_timeout,
        close_timeout=config.close_timeout,
        keep_alive_interval=config.keep_alive_interval,
        keep_alive_max_attempt=config.keep_alive_max_attempt,
        heartbeat_timeout=config.heartbeat_timeout,
        secret=config.secret,
        scale_up_at=config.scale_up_at,
        scale_up_max_delay=config.scale_up_max_delay,
        expected_nodes=config.expected_nodes or None,
    )


class Launcher:
    """Run ``config.cmd`` elastically. Create, then call :meth:`run` on the main thread; it returns the exit status."""

    def __init__(
        self,
        config: LaunchConfig,
        handler: RendezvousHandler | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.handler = handler or handler_for(config)
        self._clock = clock
        self._child: WorkerGroup | None = None
        self._setup = WorkerSetup(
            endpoint=config.endpoint,
            run_id=config.run_id,
            nproc=config.nproc_per_node,
            max_restarts=config.max_restarts,
            storage_options=config.storage_options,
            secret_file=config.secret_file,
            flag_path=self.handler.scale_up.flag_path,
        )
        self._pending_signal: int | None = None
        self._forwarded_at: float | None = None
        self._killed = False
        self._closed_seen = False
        self.restarts = 0
        #: Completed rounds this launcher ran the command in (tests and the demo read it).
        self.rounds: list[RendezvousInfo] = []

    # -- signals -------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        child = self._child
        if child is not None and child.running():
            # Forwarding happens in the monitor loop, not here: a handler must not block or race the loop.
            if self._pending_signal is not None or self._forwarded_at is not None:
                self._kill_group(signal.SIGKILL)  # a second signal: the user means it
            self._pending_signal = signum
            return
        raise _Interrupted(signum)

    @contextlib.contextmanager
    def _signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Join, run, monitor and re-form until the command succeeds or fails for good; return the exit status.

        :raises RendezvousError: the first join failed (timeout, closed run, storage, configuration); the CLI turns
            it into a one-line error.
        """
        with self._signals():
            try:
                return self._loop()
            except _Interrupted as exc:
                name = signal.Signals(exc.signum).name
                log.info("%s while no command was running: leaving run %r open and exiting", name, self.config.run_id)
                return 128 + exc.signum
            finally:
                self._stop_child("the launcher is exiting")

    def _loop(self) -> int:
        config = self.config
        last_failure: int | None = None
        log.info(
            "joining run %r at %s as node %s (nnodes %d:%d, max restarts %d)",
            config.run_id,
            config.endpoint,
            self.handler.node_id,
            config.min_nodes,
            config.max_nodes,
            config.max_restarts,
        )
        while True:
            if self._pending_signal is not None:
                # It arrived while the previous command was being stopped: honour it before joining again.
                raise _Interrupted(self._pending_signal)
            try:
                info = self.handler.next_rendezvous()
            except RendezvousGracefulExitError:
                log.info("the run closed while this node waited as a spare: nothing to do")
                return 0
            except RendezvousClosedError:
                if last_failure is not None:
                    log.info("run %r was closed by another node: not restarting; exit %d", config.run_id, last_failure)
                    return last_failure
                # Closed before or between rounds of this node: the CLI reports it as one line, status 1.
                raise
            self.rounds.append(info)
            check = RoundCheck(self.handler, info, config.watch_peers)
            log.info(
                "round %d complete: rank %d of %d, master %s:%d; starting the command%s",
                info.round,
                info.rank,
                info.world_size,
                info.master_addr,
                info.master_port,
                f" (restart {self.restarts} of {config.max_restarts})" if self.restarts else "",
            )
            self._start_child(info)
            outcome = self._monitor(check)
            self._closed_seen = self._closed_seen or check.closed_seen
            if outcome.kind == "membership":
                log.info("re-forming: %s", outcome.reason)
                self._stop_child(outcome.reason)
                last_failure = None
                continue
            code = outcome.code
            if outcome.kind == "signalled":
                log.info(
                    "the command exited with %d after the forwarded signal; run %r stays open", code, config.run_id
                )
                return code
            if code == 0:
                log.info("the command succeeded: closing run %r", config.run_id)
                self._close()
                return 0
            if self._closed_seen:
                log.info("the command failed with %d and run %r is closed: not restarting", code, config.run_id)
                return code
            if self.restarts < config.max_restarts:
                self.restarts += 1
                last_failure = code
                log.warning("the command failed with %d: restart %d of %d", code, self.restarts, config.max_restarts)
                continue
            log.error(
                "the command failed with %d and no restart is left (max %d): closing run %r",
                code,
                config.max_restarts,
                config.run_id,
            )
            self._close()
            return code

    def _close(self) -> None:
        # shutdown() closes the run for every node and removes this node's records (an idempotent close).
        if not self.handler.shutdown():
            log.warning("could not close run %r; the other nodes will notice this node's absence", self.config.run_id)

    # -- the command ---------------------------------------------------------------------------------------

    def _start_child(self, info: RendezvousInfo) -> None:
        node_id, count = self.handler.node_id, self.config.nproc_per_node
        envs = [worker_env(info, self._setup, self.restarts, node_id, local) for local in range(count)]
        self._pending_signal = None
        self._forwarded_at = None
        self._killed = False
        self._child = WorkerGroup(self.config.cmd, envs)

    def _kill_group(self, sig: int) -> None:
        if self._child is not None:
            self._child.kill(sig)

    def _stop_child(self, why: str) -> None:
        """Stop every local process's group: SIGTERM, then SIGKILL after ``stop_timeout``."""
        if self._child is not None:
            self._child.stop(self.config.stop_timeout, why)
            self._child = None

    def _monitor(self, check: RoundCheck) -> _Outcome:
        child = self._child
        assert child is not None
        config = self.config
        next_check = self._clock() + config.monitor_interval
        storage_warned = False
        while True:
            status = child.wait(TICK)
            if status is not None:
                if child.running():  # one local process failed: torchrun stops the others too
                    child.stop(config.stop_timeout, f"a local process exited with {status}")
                return _Outcome("signalled" if self._forwarded_at is not None else "exited", status)
            now = self._clock()
            if self._pending_signal is not None:
                signum, self._pending_signal = self._pending_signal, None
                pids = ", ".join(map(str, child.pids))
                log.info("forwarding %s to the command (pid %s)", signal.Signals(signum).name, pids)
                self._kill_group(signum)
                self._forwarded_at = now
                continue
            if self._forwarded_at is not None:
                if not self._killed and now - self._forwarded_at > config.stop_timeout:
                    log.warning("the command did not exit %.1fs after the signal: SIGKILL", config.stop_timeout)
                    self._kill_group(signal.SIGKILL)
                    self._killed = True
                continue
            if check.closed_seen or now < next_check:
                continue
            next_check = now + config.monitor_interval
            try:
                reason = check.change(now)
                storage_warned = False
            except StorageError as exc:
                # The command may well be fine; keep it running and look again next time.
                if not storage_warned:
                    log.warning("cannot check the membership (will retry): %s", exc)
                    storage_warned = True
                continue
            if reason:
                return _Outcome("membership", reason=reason)
