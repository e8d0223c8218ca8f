"""The conformance suite against the built-in local stores: a directory on disk, tmpfs, and memory://."""

from __future__ import annotations

import hashlib
import os
import pathlib
import uuid
from typing import Any

import pytest

from fsrdzv import Snapshot, StateCorruptError
from fsrdzv._store import seal
from fsrdzv._stores._file import FileStore
from fsrdzv.testing import StoreConformance, StoreSpec


class TestDirectoryStore(StoreConformance):
    processes = 4
    increments = 50

    @pytest.fixture
    def spec(self, tmp_path: pathlib.Path) -> StoreSpec:
        return StoreSpec.at(str(tmp_path / "rdzv"))


class TestTmpfsStore(TestDirectoryStore):
    @pytest.fixture
    def spec(self) -> StoreSpec:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        return StoreSpec.at(f"file://{base}/fsrdzv-test-{uuid.uuid4().hex[:8]}")


class TestDirectoryStoreWithoutLock(TestDirectoryStore):
    """The NFS ``nolock``/``local_lock`` case: the lock does not exclude, link(2) must keep CAS exact."""

    processes = 8
    increments = 200

    @pytest.fixture
    def spec(self, tmp_path: pathlib.Path) -> StoreSpec:
        return StoreSpec.at(str(tmp_path / "nolock"), storage_options={"lock": False})


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def spec(self) -> StoreSpec:
        return StoreSpec.at(f"memory://conf-{uuid.uuid4().hex[:8]}")

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


# -- the directory store's read path: one hash per read, rolling forward as strictly as before -------------------


def _file_store(tmp_path: os.PathLike[str]) -> FileStore:
    return FileStore(str(tmp_path), "run")


def _sha256_calls_over(size: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the length of every sha256 input of at least ``size`` bytes (the document, not headers)."""
    calls: list[int] = []
    real = hashlib.sha256

    def counting(data: bytes = b"", **kwargs: Any) -> Any:
        if len(data) >= size:
            calls.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting)
    return calls


def test_one_read_hashes_the_document_once(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    store = _file_store(tmp_path)
    first = store.compare_and_set(b"x" * 100_000, None).snapshot
    assert first is not None
    calls = _sha256_calls_over(100_000, monkeypatch)
    snap = store.read()
    assert snap == first
    assert len(calls) == 1  # was 3: completeness check, version, unseal
    calls.clear()
    result = store.compare_and_set(b"y" * 100_000, snap.token)
    assert result.won
    assert len(calls) == 2  # sealing the new document and checking the current one (was 5)
    assert store.read() == result.snapshot


def _two_generations(tmp_path: os.PathLike[str]) -> tuple[FileStore, Snapshot, Snapshot]:
    store = _file_store(tmp_path)
    first = store.compare_and_set(b"a" * 500, None).snapshot
    assert first is not None
    second = store.compare_and_set(b"b" * 500, first.token).snapshot
    assert second is not None
    return store, first, second


def test_a_damaged_state_is_reported_even_when_newer_log_entries_exist(tmp_path: os.PathLike[str]) -> None:
    store, first, second = _two_generations(tmp_path)
    sealed = seal(first.data, first.generation)
    with open(store.state_path, "wb") as f:
        f.write(sealed[: len(sealed) // 2])  # a header of generation 1 with half its payload; log/2 exists
    with pytest.raises(StateCorruptError):
        store.read()
    with pytest.raises(StateCorruptError):  # the CAS loses and its re-read fails closed
        store.compare_and_set(b"c", second.token)
    assert len(os.listdir(store.log_dir)) == 2  # nothing was committed on top of it


def test_readers_roll_forward_from_an_old_state(tmp_path: os.PathLike[str]) -> None:
    store, first, second = _two_generations(tmp_path)
    with open(store.state_path, "wb") as f:
        f.write(seal(first.data, first.generation))  # a writer died between its commit and publishing ``state``
    assert store.read() == second
    assert not store.compare_and_set(b"stale", first.token).won
    assert store.compare_and_set(b"c", second.token).won
