"""The job secret: read from a file, never from the command line; ``FSRDZV_SECRET_FILE`` is read here only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from ._errors import ConfigurationError

__all__ = ["SECRET_FILE_ENV", "job_secret", "read_secret_file"]

#: The environment variable naming the job secret file (the default of ``--secret-file`` and ``create_handler``).
SECRET_FILE_ENV: Final = "FSRDZV_SECRET_FILE"  # noqa: S105 - the name of a variable, not a secret

#: Shorter secrets are refused: an HMAC key an attacker can guess protects nothing.
MIN_SECRET_BYTES: Final = 16


def read_secret_file(path: str) -> bytes:
    """Read a job secret file (whitespace stripped). Raises ConfigurationError if unusable."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the secret file {path!r}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigurationError(f"the secret in {path!r} is shorter than 16 bytes; use a long random value")
    return secret


def job_secret(path: str | None = None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The job secret from ``path``, else from the file named by ``$FSRDZV_SECRET_FILE``, else None."""
    if not path:
        path = (os.environ if environ is None else environ).get(SECRET_FILE_ENV)
    return read_secret_file(path) if path else None
