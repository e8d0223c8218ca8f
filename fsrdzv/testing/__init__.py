"""Test support shipped with fsrdzv: a store conformance suite, a fault-injecting store and a fake clock.

Run the conformance suite against any store by subclassing :class:`StoreConformance` in a pytest module and
providing two fixtures::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def spec(self, tmp_path):            # picklable: child processes open their own store from it
            return StoreSpec(endpoint=str(tmp_path), storage_options={})

        def corrupt(self, store, raw):        # write raw bytes where the document lives, bypassing fsrdzv
            store.corrupt_for_tests(raw)
"""

from __future__ import annotations

from ._clock import FakeClock
from ._conformance import StoreConformance, StoreSpec, increment_worker
from ._faulty import FaultyStore, LostReplyError, TransientFault

__all__ = [
    "FakeClock",
    "FaultyStore",
    "LostReplyError",
    "StoreConformance",
    "StoreSpec",
    "TransientFault",
    "increment_worker",
]
