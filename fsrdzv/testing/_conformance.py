"""The store conformance suite: every store, built-in or third-party, must pass it.

It checks the compare-and-set table of the contract, linearizability under real process contention, corrupt
and foreign documents, per-node records, and isolation of run ids sharing an endpoint.
"""

from __future__ import annotations

import functools
import multiprocessing
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from .._errors import StateCorruptError
from .._store import Store
from .._stores import open_store
from ._corrupt import corrupt

__all__ = ["StoreConformance", "StoreSpec", "increment_worker"]


def _open_at(endpoint: str, storage_options: Mapping[str, Any], run_id: str) -> Store:
    return open_store(endpoint, run_id, storage_options=dict(storage_options))


@dataclass(frozen=True)
class StoreSpec:
    """How to open the store of any run: ``factory(run_id)``. Picklable (a module-level function or a
    ``functools.partial`` of one), so that child processes can open their own."""

    factory: Callable[[str], Store]

    @classmethod
    def at(cls, endpoint: str, storage_options: Mapping[str, Any] | None = None) -> StoreSpec:
        """The spec of :func:`fsrdzv.open_store` at ``endpoint`` with ``storage_options``."""
        return cls(functools.partial(_open_at, endpoint, dict(storage_options or {})))

    def open(self, run_id: str) -> Store:
        return self.factory(run_id)


def increment_worker(spec: StoreSpec, run_id: str, count: int, barrier: Any = None) -> int:
    """Increment the counter document ``count`` times with read + CAS retries; return the CAS attempts made."""
    store = spec.open(run_id)
    if barrier is not None:
        barrier.wait()
    attempts = 0
    done = 0
    while done < count:
        snap = store.read()
        value = int(snap.data) if snap is not None else 0
        attempts += 1
        result = store.compare_and_set(str(value + 1).encode(), None if snap is None else snap.token)
        if result.won:
            done += 1
    store.close()
    return attempts


class StoreConformance:
    """Mixin of pytest tests. Subclasses provide a ``spec`` fixture; a third-party store also overrides
    ``corrupt(store, raw)`` (the default knows the built-in stores)."""

    #: processes x increments for the linearizability test (subclasses may lower it for slow emulators).
    processes = 4
    increments = 25

    def corrupt(self, store: Store, raw: bytes) -> None:
        """Write ``raw`` where ``store`` keeps its document, bypassing fsrdzv."""
        corrupt(store, raw)

    @pytest.fixture
    def run_id(self) -> str:
        return "conf-" + uuid.uuid4().hex[:12]

    @pytest.fixture
    def store(self, spec: StoreSpec, run_id: str) -> Store:
        return spec.open(run_id)

    # -- the CAS table -------------------------------------------------------------------------------------

    def test_read_absent_is_none(self, store: Store) -> None:
        assert store.read() is None

    def test_create_if_absent(self, store: Store) -> None:
        result = store.compare_and_set(b"x", None)
        assert result.won
        assert result.snapshot is not None and result.snapshot.data == b"x"
        snap = store.read()
        assert snap is not None
        assert snap.data == b"x"
        assert snap.token == result.snapshot.token

    def test_create_when_present_loses(self, store: Store) -> None:
        first = store.compare_and_set(b"x", None)
        result = store.compare_and_set(b"y", None)
        assert not result.won
        assert result.snapshot == first.snapshot
        assert store.read() == first.snapshot

    def test_current_token_writes_new_token(self, store: Store) -> None:
        first = store.compare_and_set(b"x", None).snapshot
        assert first is not None
        result = store.compare_and_set(b"y", first.token)
        assert result.won
        assert result.snapshot is not None
        assert result.snapshot.data == b"y"
        assert result.snapshot.token != first.token
        assert result.snapshot.generation > first.generation
        assert store.read() == result.snapshot

    def test_same_bytes_twice_gives_new_token(self, store: Store) -> None:
        # S3 ETags repeat for equal bodies; the envelope's generation must still make the token new (no ABA).
        first = store.compare_and_set(b"same", None).snapshot
        assert first is not None
        second = store.compare_and_set(b"same", first.token).snapshot
        assert second is not None and second.token != first.token
        assert not store.compare_and_set(b"same", first.token).won

    def test_stale_token_loses(self, store: Store) -> None:
        first = store.compare_and_set(b"x", None).snapshot
        assert first is not None
        second = store.compare_and_set(b"y", first.token).snapshot
        result = store.compare_and_set(b"z", first.token)
        assert not result.won
        assert result.snapshot == second
        assert store.read() == second

    @pytest.mark.parametrize(
        "bad",
        ["invalid", "", ":", "999:nope", "-1:x", "\u00b2:x", "1:\u00b2", 42, 3.5, b"1:x", ["1"], object()],
        ids=[
            "word",
            "empty",
            "colon",
            "future",
            "negative",
            "unicode-gen",
            "unicode-version",
            "int",
            "float",
            "bytes",
            "list",
            "object",
        ],
    )
    def test_invalid_token_loses_without_raising(self, store: Store, bad: object) -> None:
        first = store.compare_and_set(b"x", None).snapshot
        result = store.compare_and_set(b"y", bad)
        assert not result.won
        assert result.snapshot == first
        assert store.read() == first

    def test_invalid_token_on_absent_document(self, store: Store) -> None:
        result = store.compare_and_set(b"y", "1:abc")
        assert not result.won
        assert result.snapshot is None
        assert store.read() is None

    def test_generation_increases(self, store: Store) -> None:
        snap = store.compare_and_set(b"0", None).snapshot
        assert snap is not None
        gens = [snap.generation]
        for i in range(5):
            snap = store.compare_and_set(str(i).encode(), snap.token).snapshot
            assert snap is not None
            gens.append(snap.generation)
        assert gens == sorted(gens) and len(set(gens)) == len(gens)

    def test_binary_and_large_payload(self, store: Store) -> None:
        payload = bytes(range(256)) * 2048  # 512 KiB, every byte value
        result = store.compare_and_set(payload, None)
        assert result.won
        snap = store.read()
        assert snap is not None and snap.data == payload

    # -- corrupt documents ---------------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "raw",
        [b"", b"{not json", b'{"round": 1}', b"fsrdzv1 gen=3 sha256=00\n{}", b"\x80\x04\x95pickle"],
        ids=["empty", "garbage", "foreign-json", "bad-checksum", "pickle"],
    )
    def test_corrupt_document_fails_closed(self, store: Store, raw: bytes) -> None:
        first = store.compare_and_set(b'{"ok": true}', None).snapshot
        assert first is not None
        self.corrupt(store, raw)
        with pytest.raises(StateCorruptError) as info:
            store.read()
        assert store.run_id in str(info.value)
        # Neither a current-looking token nor a create may overwrite it.
        with pytest.raises(StateCorruptError):
            store.compare_and_set(b"new", first.token)
        with pytest.raises(StateCorruptError):
            store.compare_and_set(b"new", None)

    def test_truncated_document_fails_closed(self, store: Store) -> None:
        first = store.compare_and_set(b'{"participants": ' + b"1" * 500 + b"}", None).snapshot
        assert first is not None
        from .._store import seal

        sealed = seal(first.data, first.generation + 1)
        self.corrupt(store, sealed[: len(sealed) // 2])
        with pytest.raises(StateCorruptError):
            store.read()

    def test_reset_replaces_corrupt_document(self, store: Store) -> None:
        store.compare_and_set(b"x", None)
        self.corrupt(store, b"garbage")
        snap = store.reset(b"fresh")
        assert snap.data == b"fresh"
        assert store.read() == snap

    # -- records -------------------------------------------------------------------------------------------

    def test_records_roundtrip_and_list(self, store: Store) -> None:
        assert store.list_records("hb") == {}
        store.put_record("hb", "node-a", b"1")
        store.put_record("hb", "10.0.0.1_42_0", b"1")
        store.put_record("join", "node-a", b"req")
        tags = store.list_records("hb")
        assert set(tags) == {"node-a", "10.0.0.1_42_0"}
        assert store.read_record("hb", "node-a") == b"1"
        assert store.read_record("join", "node-a") == b"req"
        assert store.read_record("hb", "missing") is None
        store.put_record("hb", "node-a", b"2")
        assert store.list_records("hb")["node-a"] != tags["node-a"]
        assert store.list_records("hb")["10.0.0.1_42_0"] == tags["10.0.0.1_42_0"]
        store.delete_record("hb", "node-a")
        store.delete_record("hb", "node-a")  # idempotent
        assert set(store.list_records("hb")) == {"10.0.0.1_42_0"}

    def test_record_tag_changes_with_each_write(self, store: Store) -> None:
        assert store.record_tag("hb", "node-a") is None
        store.put_record("hb", "node-a", b"1")
        store.put_record("hb", "fe80::1%eth0_1_0", b"1")
        first = store.record_tag("hb", "node-a")
        other = store.record_tag("hb", "fe80::1%eth0_1_0")
        assert first is not None and other is not None
        assert store.record_tag("hb", "node-a") == first  # stable while unchanged
        store.put_record("hb", "node-a", b"2")
        second = store.record_tag("hb", "node-a")
        assert second not in (None, first)
        store.put_record("hb", "node-a", b"3")
        assert store.record_tag("hb", "node-a") not in (None, first, second)
        assert store.record_tag("hb", "fe80::1%eth0_1_0") == other
        assert store.record_tag("join", "node-a") is None  # kinds are apart
        store.delete_record("hb", "node-a")
        assert store.record_tag("hb", "node-a") is None

    @pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "fe80::1%eth0_1_0", "ü-node", "a\\b"])
    def test_record_names_cannot_escape(self, store: Store, spec: StoreSpec, name: str) -> None:
        store.put_record("hb", name, b"x")
        assert store.read_record("hb", name) == b"x"
        assert list(store.list_records("hb")) == [name]
        other = spec.open(store.run_id + "-other")
        assert other.list_records("hb") == {}
        assert other.read() is None

    def test_runs_are_isolated(self, spec: StoreSpec, run_id: str) -> None:
        a = spec.open(run_id + "-a")
        b = spec.open(run_id + "-b")
        a.compare_and_set(b"a", None)
        a.put_record("hb", "n", b"1")
        assert b.read() is None
        assert b.list_records("hb") == {}
        b.compare_and_set(b"b", None)
        snap = a.read()
        assert snap is not None and snap.data == b"a"

    def test_delete_run(self, store: Store) -> None:
        store.compare_and_set(b"x", None)
        store.put_record("hb", "n", b"1")
        store.delete_run()
        assert store.read() is None
        assert store.list_records("hb") == {}
        assert store.compare_and_set(b"again", None).won

    # -- linearizability -----------------------------------------------------------------------------------

    def test_equal_writes_from_one_document_have_one_winner(self, store: Store) -> None:
        """Two writers making the same change from the same document: exactly one wins (a store that recognises
        its own write behind a refused retry must not take an equal write of another for it)."""
        base = store.compare_and_set(b"1", None).snapshot
        assert base is not None
        first = store.compare_and_set(b"2", base.token)
        second = store.compare_and_set(b"2", base.token)
        assert first.won and not second.won
        assert first.snapshot is not None and second.snapshot is not None
        assert second.snapshot.token == first.snapshot.token

    def test_concurrent_increments_are_exact(self, spec: StoreSpec, run_id: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Manager().Barrier(self.processes)
        with ctx.Pool(self.processes) as pool:
            results = [
                pool.apply_async(increment_worker, (spec, run_id, self.increments, barrier))
                for _ in range(self.processes)
            ]
            attempts = [r.get(timeout=600) for r in results]
        snap = spec.open(run_id).read()
        assert snap is not None
        assert int(snap.data) == self.processes * self.increments, attempts
        assert snap.generation == self.processes * self.increments
