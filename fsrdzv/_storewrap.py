"""A store that delegates to another (:class:`StoreWrapper`): what fault injection, latency and counting wrap.

Wrapping happens at the public layer of :class:`~fsrdzv._store.Store`, so the inner store's envelope, signature
and conditions stay intact.
"""

from __future__ import annotations

import dataclasses

from ._store import CasResult, ChangeWatch, NotModified, Snapshot, Store, StoreCapabilities

__all__ = ["StoreWrapper"]


class StoreWrapper(Store):
    """Delegates every public method to ``inner``; subclasses override only what they change.

    Wrapping happens at the public layer, so the inner store's envelope, signature and conditions stay intact.
    """

    def __init__(self, inner: Store, location: str | None = None) -> None:
        super().__init__(inner.run_id, inner.location if location is None else location)
        self.inner = inner
        self.enforces_conditions = inner.enforces_conditions

    def read(self) -> Snapshot | None:
        return self.inner.read()

    def read_if_changed(self, token: object) -> Snapshot | NotModified | None:
        # A wrapper that changes read() (faults, counts) must see conditional reads too: it compares on its own.
        if type(self).read is not StoreWrapper.read and type(self).read_if_changed is StoreWrapper.read_if_changed:
            return Store.read_if_changed(self, token)
        return self.inner.read_if_changed(token)

    def compare_and_set(self, data: bytes, token: object = None) -> CasResult:
        return self.inner.compare_and_set(data, token)

    def put_record(self, kind: str, name: str, data: bytes) -> None:
        self.inner.put_record(kind, name, data)

    def read_record(self, kind: str, name: str) -> bytes | None:
        return self.inner.read_record(kind, name)

    def record_tag(self, kind: str, name: str) -> str | None:
        # As for conditional reads: a wrapper that changes read_record() must see tag reads through it too.
        if type(self).read_record is not StoreWrapper.read_record and type(self).record_tag is StoreWrapper.record_tag:
            return Store.record_tag(self, kind, name)
        return self.inner.record_tag(kind, name)

    def record_digest(self, payload: bytes) -> str | None:
        return self.inner.record_digest(payload)

    def list_records(self, kind: str) -> dict[str, str]:
        return self.inner.list_records(kind)

    def delete_record(self, kind: str, name: str) -> None:
        self.inner.delete_record(kind, name)

    def delete_run(self) -> None:
        self.inner.delete_run()

    def reset(self, data: bytes) -> Snapshot:
        return self.inner.reset(data)

    @property
    def signed(self) -> bool:
        return self.inner.signed

    def name_mac(self, text: str) -> str | None:
        return self.inner.name_mac(text)

    def sibling(self, run_id: str) -> Store:
        return self.inner.sibling(run_id)

    def verify_conditions(self) -> None:
        self.inner.verify_conditions()

    def change_watch(self, kinds: tuple[str, ...] = (), document: bool = True) -> ChangeWatch | None:
        return self.inner.change_watch(kinds, document)

    @property
    def capabilities(self) -> StoreCapabilities:
        capabilities = self.inner.capabilities
        if type(self).read_record is not StoreWrapper.read_record and type(self).record_tag is StoreWrapper.record_tag:
            # Its tags are digests of what its read_record returns (see record_tag), not of the stored bytes.
            return dataclasses.replace(capabilities, content_tags=False)
        return capabilities

    def last_modified(self) -> float | None:
        return self.inner.last_modified()

    def highest_generation(self) -> int:
        return self.inner.highest_generation()

    def describe(self, what: str) -> str:
        return self.inner.describe(what)

    def close(self) -> None:
        self.inner.close()
