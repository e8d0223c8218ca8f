"""The conformance suite against the built-in local stores: a directory on disk, tmpfs, and memory://."""

from __future__ import annotations

import os
import uuid

import pytest

from fsrdzv import Store
from fsrdzv.testing import StoreConformance, StoreSpec


class TestDirectoryStore(StoreConformance):
    processes = 4
    increments = 50

    @pytest.fixture
    def spec(self, tmp_path: os.PathLike[str]) -> StoreSpec:
        return StoreSpec(endpoint=str(tmp_path / "rdzv"))

    def corrupt(self, store: Store, raw: bytes) -> None:
        store.corrupt_for_tests(raw)  # type: ignore[attr-defined]


class TestTmpfsStore(TestDirectoryStore):
    @pytest.fixture
    def spec(self) -> StoreSpec:  # type: ignore[override]
        base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        return StoreSpec(endpoint=f"file://{base}/fsrdzv-test-{uuid.uuid4().hex[:8]}")


class TestDirectoryStoreWithoutLock(TestDirectoryStore):
    """The NFS ``nolock``/``local_lock`` case: the lock does not exclude, link(2) must keep CAS exact."""

    processes = 8
    increments = 200

    @pytest.fixture
    def spec(self, tmp_path: os.PathLike[str]) -> StoreSpec:  # type: ignore[override]
        return StoreSpec(endpoint=str(tmp_path / "nolock"), storage_options={"lock": False})


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def spec(self) -> StoreSpec:
        return StoreSpec(endpoint=f"memory://conf-{uuid.uuid4().hex[:8]}")

    def corrupt(self, store: Store, raw: bytes) -> None:
        store.corrupt_for_tests(raw)  # type: ignore[attr-defined]

    def test_concurrent_increments_are_exact(self, spec: StoreSpec, run_id: str) -> None:
        # memory:// is per process: contend with threads instead.
        import threading

        from fsrdzv.testing import increment_worker

        threads = [threading.Thread(target=increment_worker, args=(spec, run_id, 200)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        snap = spec.open(run_id).read()
        assert snap is not None and int(snap.data) == 1600
