"""Endpoint parsing and the registry of built-in stores.

Object-store modules are imported lazily, so ``import fsrdzv`` needs neither s3fs nor the Azure or Google SDKs;
a missing SDK gives an error that names the extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any, Final
from urllib.parse import urlsplit

from .._errors import ConfigurationError, UnsupportedStoreError
from .._store import Store, validate_run_id

__all__ = ["SCHEMES", "list_runs", "open_store", "split_endpoint"]

#: scheme -> (module, class, pip extra). A plain path means ``file``.
SCHEMES: Final[dict[str, tuple[str, str, str]]] = {
    "file": ("fsrdzv._stores._file", "FileStore", ""),
    "memory": ("fsrdzv._stores._memory", "MemoryStore", ""),
    "s3": ("fsrdzv._stores._s3", "S3Store", "s3"),
    "az": ("fsrdzv._stores._azure", "AzureStore", "azure"),
    "abfs": ("fsrdzv._stores._azure", "AzureStore", "azure"),
    "abfss": ("fsrdzv._stores._azure", "AzureStore", "azure"),
    "gs": ("fsrdzv._stores._gcs", "GcsStore", "gcs"),
    "gcs": ("fsrdzv._stores._gcs", "GcsStore", "gcs"),
}

#: Top-level module of an SDK -> the package that installs it (for the message of a missing extra).
_PACKAGES: Final = {"google": "google-cloud-storage", "azure": "azure-storage-blob", "azure.identity": "azure-identity"}

_FILE_OPTIONS: Final = {"lock", "lock_timeout", "permissions", "fsync"}


def split_endpoint(endpoint: object) -> tuple[str, str]:
    """Return ``(scheme, rest)``: ``("file", "/abs/path")``, ``("s3", "bucket/prefix")``, ``("memory", "name")``."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigurationError(
            f"invalid endpoint {endpoint!r}: give a shared directory (/shared/rdzv), file://, s3://bucket/prefix, "
            "az://container/prefix, gs://bucket/prefix or memory://name"
        )
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        return "file", endpoint
    parts = urlsplit(endpoint)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigurationError(f"file endpoint {endpoint!r} names a host; use file:///absolute/path")
        return "file", parts.path
    rest = endpoint.split("://", 1)[1].strip("/")
    if scheme not in SCHEMES:
        raise UnsupportedStoreError(
            f"endpoint {endpoint!r}: scheme {scheme!r} is not supported. fsrdzv needs atomic conditional writes, "
            "which it uses on local/shared directories, s3://, az:// (abfs://), gs:// and memory://; a generic "
            "fsspec file system cannot give compare-and-set and is refused"
        )
    if not rest:
        raise ConfigurationError(f"endpoint {endpoint!r} names no bucket or container")
    return scheme, rest


def _store_class(scheme: str) -> Any:
    module_name, class_name, extra = SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # exc.name may be a namespace ("google", "azure"): name the package that provides it.
        name = f"{exc.name}"
        missing = _PACKAGES.get(name, _PACKAGES.get(name.partition(".")[0], name))
        raise ConfigurationError(
            f"{scheme}:// endpoints need extra packages ({missing} is missing): pip install '.[{extra}]' "
            "in a clone of fsrdzv"
        ) from exc
    return getattr(module, class_name)


def open_store(
    endpoint: str,
    run_id: str,
    *,
    storage_options: dict[str, Any] | None = None,
    secret: bytes | None = None,
) -> Store:
    """Open the store of ``run_id`` at ``endpoint``.

    :param endpoint: a directory or ``file://`` URL, ``memory://NAME``, ``s3://bucket/prefix``,
        ``az://container/prefix`` (``abfs://``), or ``gs://bucket/prefix``.
    :param storage_options: options for the store. Directories take ``lock``, ``lock_timeout``, ``permissions``
        and ``fsync``; object stores pass theirs to fsspec / the SDK (``endpoint_url``, credentials, ...).
    :param secret: a job secret; when set every document and record carries an HMAC-SHA256, and unsigned or
        tampered data is rejected.
    :raises ConfigurationError: invalid endpoint, run id or option.
    :raises UnsupportedStoreError: the endpoint cannot give compare-and-set (or ignores conditions).
    """
    validate_run_id(run_id)
    scheme, rest = split_endpoint(endpoint)
    options = dict(storage_options or {})
    if scheme == "file":
        unknown = set(options) - _FILE_OPTIONS
        if unknown:
            raise ConfigurationError(
                f"unknown storage option(s) {sorted(unknown)} for directory endpoint {endpoint!r}; "
                f"known: {sorted(_FILE_OPTIONS)}"
            )
        from ._file import FileStore

        return FileStore(rest, run_id, secret=secret, **options)
    if scheme == "memory":
        if options:
            raise ConfigurationError(f"memory:// endpoints take no storage options (got {sorted(options)})")
        from ._memory import MemoryStore

        return MemoryStore(rest, run_id, secret=secret)
    cls = _store_class(scheme)
    store: Store = cls(rest, run_id, storage_options=options, secret=secret)
    return store


def list_runs(endpoint: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Return the run ids that have data at ``endpoint``, sorted."""
    scheme, rest = split_endpoint(endpoint)
    if scheme == "file":
        from ._fileio import list_file_runs

        return list_file_runs(rest)
    if scheme == "memory":
        from ._memory import memory_space

        space = memory_space(rest)
        with space.lock:
            return sorted(k for k, v in space.runs.items() if v.doc is not None or v.records)
    cls = _store_class(scheme)
    runs: list[str] = cls.list_runs(rest, storage_options=dict(storage_options or {}))
    return runs
