"""The one exception tree of fsrdzv.

.. code-block:: text

    RendezvousError                       (everything fsrdzv raises on purpose)
    ├── RendezvousClosedError             the run was closed; this node must not join again
    ├── RendezvousGracefulExitError       a spare saw the run close: exit, this is not a failure
    ├── RendezvousTimeoutError            (also TimeoutError) a join/close/keep-alive passed its deadline
    ├── RendezvousConnectionError         (also ConnectionError) the storage could not be reached or refused us
    │   └── StorageError                  (also OSError) a storage operation failed (disk full, permission, ...)
    ├── RendezvousStateError              the shared state cannot be used
    │   ├── StateCorruptError             the stored document is unreadable (corrupt, truncated, foreign)
    │   ├── SchemaVersionError            the document was written by a newer fsrdzv
    │   └── TamperedError                 an HMAC did not verify (job secret configured)
    └── ConfigurationError                (also ValueError) a setting, endpoint or run id is invalid
        └── UnsupportedStoreError         the endpoint cannot give compare-and-set (no conditional writes)

The class names mirror torch's ``RendezvousError`` tree so that :mod:`fsrdzv.torchrun` can map them one to one.
Every error carries a message that says what went wrong, on which object, and what to do about it, and every error
pickles (the launcher passes them between processes).
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousStateError",
    "RendezvousTimeoutError",
    "SchemaVersionError",
    "StateCorruptError",
    "StorageError",
    "TamperedError",
    "UnsupportedStoreError",
]


class RendezvousError(Exception):
    """Base class of every error fsrdzv raises on purpose."""


class RendezvousClosedError(RendezvousError):
    """The rendezvous of this run was closed; no further round can be joined."""


class RendezvousGracefulExitError(RendezvousError):
    """A spare node saw the run close. The node should exit successfully."""


class RendezvousTimeoutError(RendezvousError, TimeoutError):
    """An operation (join, close, keep-alive) did not finish before its deadline."""


class RendezvousConnectionError(RendezvousError, ConnectionError):
    """The storage behind the endpoint could not be reached or refused the request."""


class StorageError(RendezvousConnectionError, OSError):
    """A storage operation failed (I/O error, disk full, permission denied, read-only file system, ...)."""


class RendezvousStateError(RendezvousError):
    """The shared rendezvous state cannot be used as it is."""


class StateCorruptError(RendezvousStateError):
    """The stored state is corrupt, truncated, empty or not an fsrdzv document.

    fsrdzv never overwrites such a document on its own (it fails closed); ``fsrdzv reset --force`` replaces it.
    """


class SchemaVersionError(RendezvousStateError):
    """The stored state was written with a newer schema than this fsrdzv understands."""


class TamperedError(RendezvousStateError):
    """A document or record did not carry a valid HMAC for the configured job secret."""


class ConfigurationError(RendezvousError, ValueError):
    """A configuration value, endpoint or run id is invalid."""


class UnsupportedStoreError(ConfigurationError):
    """The endpoint cannot provide an atomic compare-and-set (it ignores or lacks conditional writes)."""
