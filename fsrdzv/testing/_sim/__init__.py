"""Scale simulation support: a virtual-time thread scheduler and a latency-and-rate model of a store.

Thousands of rendezvous nodes run the real handler code as threads of one process. Every thread's ``sleep`` and
every modelled storage latency blocks it until the *virtual* clock reaches its wake-up time; when every thread is
blocked, the scheduler moves the clock to the earliest wake-up and runs that thread (one at a time, so a run is
deterministic for a given seed). Minutes of simulated time for 4,096 nodes take seconds to minutes of real time,
on any number of cores. CPU time is not modelled: the protocol's own computation takes zero virtual time.

Typical use::

    clock = VirtualClock()
    storage = SimStorage(S3, clock, seed=1)
    store = storage.open("memory-space-name", run_id)    # one SimStore per node
    runtime = SimRuntime(clock)                           # keep-alive threads on virtual time
    handler = RendezvousHandler(store, settings, clock=clock, sleep=clock.sleep, runtime=runtime)
    clock.spawn(handler.next_rendezvous)
    clock.run()

The model (:class:`StoreModel`) gives each operation kind a log-normal latency, limits the conditional-write
rate of each object with a token bucket (answered as the real store answers a throttled write: a lost
compare-and-set, a retried 429, or an error), and limits the request rate of the whole run's prefix (S3's
per-prefix 5,500 GET/s and 3,500 PUT/s, GCS's initial per-bucket rates), with the SDK's own retries.
"""

from __future__ import annotations

from ._models import GCS, GCS_THROTTLED, NFS, PRESETS, S3, S3_THROTTLED, StoreModel
from ._runtime import SimRuntime, simulated_handlers
from ._scheduler import SimulationStalled, SimulationStopped, VirtualClock
from ._store import SimCounters, SimStorage, SimStore, Throttled

__all__ = [
    "GCS",
    "GCS_THROTTLED",
    "NFS",
    "PRESETS",
    "S3",
    "S3_THROTTLED",
    "SimCounters",
    "SimRuntime",
    "SimStorage",
    "SimStore",
    "SimulationStalled",
    "SimulationStopped",
    "StoreModel",
    "Throttled",
    "VirtualClock",
    "simulated_handlers",
]
