"""Key parts of the object stores: bucket and prefix of an endpoint, keys, record kinds."""

from __future__ import annotations

from .._errors import ConfigurationError

__all__ = ["check_kind", "join_key", "split_rest"]


def split_rest(rest: str, scheme: str) -> tuple[str, str]:
    """Split ``"bucket/some/prefix"`` into ``("bucket", "some/prefix")`` (the prefix may be empty)."""
    bucket, _, prefix = rest.strip("/").partition("/")
    prefix = "/".join(part for part in prefix.split("/") if part)
    if not bucket:
        raise ConfigurationError(f"{scheme}://{rest} names no bucket or container")
    if any(part in {".", ".."} for part in prefix.split("/")):
        raise ConfigurationError(f"{scheme}://{rest}: '.' and '..' are not allowed in the prefix")
    return bucket, prefix


def join_key(*parts: str) -> str:
    """Join key components with ``/``, skipping empty ones (an empty prefix adds nothing)."""
    return "/".join(p for p in parts if p)


def check_kind(kind: str) -> str:
    """Record kinds become one key component: keep them to identifiers, as the directory store does."""
    if not kind.isidentifier():
        raise ConfigurationError(f"record kind {kind!r} must be an identifier")
    return kind
