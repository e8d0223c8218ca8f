"""torch's ``RendezvousBackend`` (one compare-and-set blob) on an fsrdzv store."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend

from .._store import Store as FsStore
from .._stores import open_store
from ._errors import torch_errors

__all__ = ["BACKEND_NAME", "FsRendezvousBackend"]

#: The name torchrun knows the backend by; it is the entry-point name and ``get_backend()`` must return it.
BACKEND_NAME: Final = "fsrdzv"


class FsRendezvousBackend(RendezvousBackend):
    """torch's ``RendezvousBackend`` contract on an fsrdzv store (a directory, ``s3://``, ``az://``, ``gs://``...).

    Use it with torch's own handler::

        backend = FsRendezvousBackend("/shared/rdzv", run_id)
        handler = DynamicRendezvousHandler.from_backend(run_id, store, backend, min_nodes, max_nodes)

    Tokens are fsrdzv's opaque ``"<generation>:<version>"`` strings; any other value (``"invalid"``, bytes, an int)
    never writes and never raises. torch's handler stores its state as a pickle and unpickles whatever it reads,
    so anyone who can write the endpoint can run code on every agent: give a ``secret`` (the job secret, from a file
    only the job can read) and fsrdzv rejects documents without a valid HMAC before torch sees them.
    """

    def __init__(
        self,
        endpoint: str,
        run_id: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        secret: bytes | None = None,
    ) -> None:
        self._store: FsStore = open_store(endpoint, run_id, storage_options=dict(storage_options or {}), secret=secret)

    @property
    def name(self) -> str:
        return BACKEND_NAME

    @property
    def store(self) -> FsStore:
        """The fsrdzv store underneath (tests and tools use it)."""
        return self._store

    def get_state(self) -> tuple[bytes, Any] | None:
        with torch_errors():
            snapshot = self._store.read()
        if snapshot is None:
            return None
        return snapshot.data, snapshot.token

    def set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool] | None:
        with torch_errors():
            # The store never raises for a foreign token: it answers won=False with the current document.
            result = self._store.compare_and_set(state, token)
        snapshot = result.snapshot
        if result.won:
            assert snapshot is not None  # a won CAS always carries the new snapshot
            return state, snapshot.token, True
        if snapshot is None:
            # A token was given but nothing is stored (the run was deleted under us): torch's "cannot tell" answer.
            # Its state holder then keeps its own copy and retries create-only.
            return None
        return snapshot.data, snapshot.token, False
