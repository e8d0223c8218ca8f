"""The envelope of every stored object, and the names that may appear in a store's keys.

Stored bytes are wrapped in a one-line envelope ``fsrdzv1 gen=<n> sha256=<hex>[ hmac=<hex>][ w=<hex>]`` followed
by the payload (readers ignore fields they do not know). The envelope gives every store a monotonic generation of
its own (S3 ETags repeat for equal bodies, GCS generations are not ordered), detects truncated or foreign objects,
carries the optional HMAC of a job secret, and on a document the id of the write (so that a store recognises its
own write behind a refused retry).
Tokens are ``"<generation>:<version>"`` (see :mod:`fsrdzv._store`).
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
from typing import Final

from ._errors import ConfigurationError, StateCorruptError, TamperedError
from ._names import validate_run_id

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_RECORD_BYTES",
    "decode_name",
    "encode_name",
    "name_signature",
    "oversized",
    "parse_token",
    "seal",
    "unseal",
    "validate_run_id",
]

#: Largest document payload accepted on write or read (bytes). 10,000 nodes take about 3.3 MB.
MAX_DOCUMENT_BYTES: Final = 32 * 1024 * 1024
#: Largest per-node record payload (bytes).
MAX_RECORD_BYTES: Final = 64 * 1024

_MAGIC: Final = b"fsrdzv1"
_SAFE_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_")


def encode_name(name: str) -> str:
    """Escape a record name (a node id) so that it can never leave its folder: ``%XX`` for unsafe bytes."""
    if not name:
        raise ConfigurationError("a record name must not be empty")
    out = []
    for ch in name:
        if ch in _SAFE_NAME_CHARS:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    encoded = "".join(out)
    if encoded.startswith("."):
        # "." and ".." and hidden temp files are reserved for the stores themselves.
        encoded = "%2E" + encoded[1:]
    return encoded


def decode_name(encoded: str) -> str:
    """Inverse of :func:`encode_name`."""
    raw = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "%" and i + 2 < len(encoded):
            raw.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(encoded[i].encode())
            i += 1
    return raw.decode()


def _mac(secret: bytes, generation: int, payload: bytes) -> str:
    return _hmac.new(secret, b"%d\n" % generation + payload, hashlib.sha256).hexdigest()


def seal(payload: bytes, generation: int, secret: bytes | None = None, write_id: str | None = None) -> bytes:
    """Wrap ``payload`` in the envelope (generation, checksum, optional HMAC and the id of one write)."""
    header = b"%s gen=%d sha256=%s" % (_MAGIC, generation, hashlib.sha256(payload).hexdigest().encode())
    if secret is not None:
        header += b" hmac=" + _mac(secret, generation, payload).encode()
    if write_id is not None:
        header += b" w=" + write_id.encode()
    return header + b"\n" + payload


#: Bytes an envelope adds to its payload at most (the header line): a stored object of more than limit + this is
#: refused unread.
ENVELOPE_SLACK: Final = 512
_CORRUPT_HINT: Final = "inspect it with 'fsrdzv status', then replace it with 'fsrdzv reset --force' if it is garbage"


def oversized(where: str, size: int, limit: int) -> StateCorruptError:
    """The error for a stored object of ``size`` bytes where at most ``limit`` (+ the envelope) belong; stores
    raise it from the size alone, before reading the object."""
    return StateCorruptError(f"{where} is {size} bytes, over the {limit}-byte limit; {_CORRUPT_HINT}")


def unseal(raw: bytes, where: str, secret: bytes | None = None, limit: int = MAX_DOCUMENT_BYTES) -> tuple[int, bytes]:
    """Check an envelope and return ``(generation, payload)``.

    :raises StateCorruptError: empty, truncated, foreign or oversized data (``where`` names the object).
    :raises TamperedError: a job secret is configured and the HMAC is missing or wrong.
    """
    hint = _CORRUPT_HINT
    if not raw:
        raise StateCorruptError(f"{where} is empty; {hint}")
    if len(raw) > limit + ENVELOPE_SLACK:
        raise oversized(where, len(raw), limit)
    head, sep, payload = raw.partition(b"\n")
    fields = head.split(b" ")
    if not sep or fields[0] != _MAGIC:
        raise StateCorruptError(f"{where} is not an fsrdzv document (no 'fsrdzv1' header); {hint}")
    values: dict[bytes, bytes] = {}
    for field in fields[1:]:
        key, eq, value = field.partition(b"=")
        if eq:
            values[key] = value
    try:
        generation = int(values[b"gen"])
        digest = values[b"sha256"].decode()
    except (KeyError, ValueError, UnicodeDecodeError):
        raise StateCorruptError(f"{where} has a malformed header {head[:80]!r}; {hint}") from None
    if hashlib.sha256(payload).hexdigest() != digest:
        raise StateCorruptError(f"{where} is truncated or altered (checksum mismatch); {hint}")
    if secret is not None:
        mac = values.get(b"hmac")
        if mac is None or not _hmac.compare_digest(mac, _mac(secret, generation, payload).encode()):
            raise TamperedError(
                f"{where} is not signed with this job's secret (missing or wrong HMAC); it was ignored. "
                "Check that every node uses the same secret_file, or look for a foreign writer."
            )
    return generation, payload


def parse_token(token: object) -> tuple[int, str] | None:
    """``(generation, version)`` of a well-formed token, else None (a CAS with it then loses)."""
    if not isinstance(token, str):
        return None
    gen_text, sep, version = token.partition(":")
    if not sep or not (gen_text.isascii() and gen_text.isdigit()):
        return None
    return int(gen_text), version


def name_signature(secret: bytes, text: str) -> str:
    """128 bits of the HMAC of a record name that carries data: short enough for any file system."""
    return _hmac.new(secret, b"name\n" + text.encode(), hashlib.sha256).hexdigest()[:32]
