"""A JAX cluster plug-in: ``jax.distributed.initialize`` finds its coordinator through an fsrdzv rendezvous.

Use it on every host::

    import fsrdzv.jax  # registers the plug-in; it never takes part in JAX's auto-detection
    jax.distributed.initialize(cluster_detection_method="fsrdzv")

Outside ``fsrdzv run`` the plug-in joins the run named by ``FSRDZV_ENDPOINT``, ``FSRDZV_RUN_ID`` (or
``SLURM_JOB_ID``) and ``FSRDZV_NNODES`` (``MIN[:MAX]``), with ``FSRDZV_STORAGE_OPTIONS``, ``FSRDZV_SECRET_FILE`` and
``FSRDZV_LOCAL_ADDR`` as elsewhere, and hands JAX rank 0's address and the port rank 0 reserved when it joined.
Under ``fsrdzv run`` it takes the launcher's round instead of joining again.

JAX's plug-in interface (``jax._src.clusters.ClusterEnv``) is private; this module is tested with the versions of
the ``fsrdzv[jax]`` extra and refuses, in one line, a JAX whose interface it does not know.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any, Final

from ._environ import launched_round, run_environment
from ._errors import ConfigurationError
from ._handler import RendezvousHandler, RendezvousInfo, create_handler
from ._ports import PortReservation

__all__ = ["TESTED_JAX", "FsrdzvCluster"]

#: The JAX releases this plug-in was tested with (the ``fsrdzv[jax]`` extra admits this range).
TESTED_JAX: Final = ">=0.4.36,<0.11"

try:
    from jax._src.clusters import ClusterEnv
except ImportError as exc:  # no JAX, or one that moved its plug-in interface
    raise ImportError(
        f"fsrdzv.jax needs JAX's cluster plug-in interface (jax {TESTED_JAX}; "
        f"pip install '.[jax]' in a clone of fsrdzv): {exc}"
    ) from None

if not hasattr(ClusterEnv, "opt_in_only_method"):
    raise ImportError(
        f"this JAX has no opt-in cluster plug-ins; fsrdzv.jax supports jax {TESTED_JAX} "
        "(pip install '.[jax]' in a clone of fsrdzv)"
    )


class _Joined:
    """The one rendezvous of this process: JAX asks for its parts in separate calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.info: RendezvousInfo | None = None
        self.handler: RendezvousHandler | None = None
        #: Bound, not listening: JAX's gRPC server binds the port itself (SO_REUSEPORT) while it is held.
        self.reservation = PortReservation(listen=False)

    def get(self) -> tuple[int, int, str, int]:
        """(rank, world size, coordinator address, coordinator port), joining on first use."""
        with self.lock:
            launched = launched_round()
            if launched is not None:
                return launched.rank, launched.world_size, launched.master_addr, launched.master_port
            if self.info is None:
                self.info = self._join()
            info = self.info
            return info.rank, info.world_size, info.master_addr, info.master_port

    def _join(self) -> RendezvousInfo:
        env = run_environment()
        self.handler = create_handler(
            env.endpoint,
            env.run_id,
            env.min_nodes,
            env.max_nodes,
            local_addr=env.local_addr,
            storage_options=env.storage_options,
            port_factory=self.reservation.reserve,
        )
        atexit.register(self.close)
        info = self.handler.next_rendezvous()
        if info.rank != 0:
            self.reservation.release()
        return info

    def close(self) -> None:
        """At exit: the job is over for this process; close the run and remove its records."""
        self.reservation.release()
        if self.handler is not None:
            self.handler.shutdown()
            self.handler = None


_joined = _Joined()


class FsrdzvCluster(ClusterEnv):  # type: ignore[no-untyped-call]  # JAX leaves __init_subclass__ untyped
    """``cluster_detection_method="fsrdzv"``: opt-in only, never chosen by JAX's auto-detection."""

    name = "fsrdzv"
    opt_in_only_method = True

    @classmethod
    def is_env_present(cls) -> bool:
        try:
            return launched_round() is not None or bool(run_environment())
        except ConfigurationError:
            return False

    @classmethod
    def get_coordinator_address(cls, *args: Any, **kwargs: Any) -> str:
        # Older JAX passes timeout_secs only, newer ones also override_coordinator_port (ignored: the port is the
        # one rank 0 reserved, which every host agreed on).
        _, _, addr, port = _joined.get()
        host = f"[{addr}]" if ":" in addr else addr
        return f"{host}:{port}"

    @classmethod
    def get_process_count(cls) -> int:
        return _joined.get()[1]

    @classmethod
    def get_process_id(cls) -> int:
        return _joined.get()[0]

    @classmethod
    def get_local_process_id(cls) -> int | None:
        # Only with several processes per host: JAX then gives each one its own local device. One process per
        # host (the default) drives all of the host's devices.
        launched = launched_round()
        if launched is None or launched.local_world_size <= 1:
            return None
        return launched.local_rank
