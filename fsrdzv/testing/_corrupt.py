"""Write raw bytes where a built-in store keeps its document, bypassing fsrdzv (tests of corrupt documents)."""

from __future__ import annotations

import hashlib
import os

from .._store import Store
from .._stores._file import FileStore
from .._stores._memory import MemoryStore
from .._stores._object import ObjectStore
from .._storewrap import StoreWrapper

__all__ = ["corrupt"]


def corrupt(store: Store, raw: bytes) -> None:
    """Overwrite the document of ``store``'s run with ``raw``, unconditionally and without an envelope.

    Knows the layout of the built-in stores (through wrappers): a directory's ``state`` and newest log entry, the
    memory store's run, an object store's ``state`` key.

    :raises TypeError: a store type it does not know (a third-party store writes its own ``corrupt``).
    """
    while isinstance(store, StoreWrapper):
        store = store.inner
    if isinstance(store, FileStore):
        _corrupt_directory(store, raw)
    elif isinstance(store, MemoryStore):
        with store.space.lock:
            run = store.space.run(store.run_id)
            run.doc = raw
            run.version = hashlib.sha256(raw).hexdigest()[:16]
    elif isinstance(store, ObjectStore):
        store.probe_delete(store.state_key)
        store.probe_create(store.state_key, raw)
    else:
        raise TypeError(f"cannot corrupt a {type(store).__name__}: not a built-in store")


def _corrupt_directory(store: FileStore, raw: bytes) -> None:
    # Readers roll forward from ``state`` through the log: the newest entry must hold the same bytes.
    os.makedirs(store.log_dir, exist_ok=True)
    entries = sorted((n for n in os.listdir(store.log_dir) if n.isdigit()), key=int)
    targets = [store.state_path] + ([os.path.join(store.log_dir, entries[-1])] if entries else [])
    for path in targets:
        with open(path, "wb") as f:
            f.write(raw)
