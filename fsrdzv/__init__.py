"""fsrdzv: elastic rendezvous on shared file systems and object stores, with no coordination server."""

from __future__ import annotations

from ._errors import (
    ConfigurationError,
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
    SchemaVersionError,
    StateCorruptError,
    StorageError,
    TamperedError,
    UnsupportedStoreError,
)
from ._handler import RendezvousHandler, RendezvousInfo, create_handler
from ._safepoint import safe_point
from ._settings import Settings
from ._store import CasResult, Snapshot, Store
from ._stores import list_runs, open_store

__version__ = "0.1.0"

__all__ = [
    "CasResult",
    "ConfigurationError",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousHandler",
    "RendezvousInfo",
    "RendezvousStateError",
    "RendezvousTimeoutError",
    "SchemaVersionError",
    "Settings",
    "Snapshot",
    "StateCorruptError",
    "StorageError",
    "Store",
    "TamperedError",
    "UnsupportedStoreError",
    "__version__",
    "create_handler",
    "list_runs",
    "open_store",
    "safe_point",
]
