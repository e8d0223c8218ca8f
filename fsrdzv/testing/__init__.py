"""Test support shipped with fsrdzv: a store conformance suite, a fault-injecting store and a fake clock.

Run the conformance suite against any store by subclassing :class:`StoreConformance` in a pytest module and
providing a ``spec`` fixture::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def spec(self, tmp_path):            # picklable: child processes open their own store from it
            return StoreSpec(functools.partial(fsrdzv.open_store, str(tmp_path)))

The suite corrupts documents with :func:`corrupt`, which knows the built-in stores; a third-party store overrides
``StoreConformance.corrupt(store, raw)`` to write raw bytes where it keeps its document.
"""

from __future__ import annotations

from ._clock import FakeClock
from ._conformance import StoreConformance, StoreSpec, increment_worker
from ._corrupt import corrupt
from ._faulty import FaultyStore, LostReplyError, TransientFault

__all__ = [
    "FakeClock",
    "FaultyStore",
    "LostReplyError",
    "StoreConformance",
    "StoreSpec",
    "TransientFault",
    "corrupt",
    "increment_worker",
]
