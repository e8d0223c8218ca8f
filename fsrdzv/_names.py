"""Names that travel into paths and object keys: the run id rule, shared by the settings and the stores."""

from __future__ import annotations

import re
from typing import Final

from ._errors import ConfigurationError

__all__ = ["RUN_ID_PATTERN", "validate_run_id"]

#: A run id is one path component and one object-key segment on every store: no separators, no leading dot/dash.
RUN_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is safe as a path and object-key component, else raise ConfigurationError."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id) or run_id in {".", ".."}:
        raise ConfigurationError(
            f"invalid run id {run_id!r}: use 1-128 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (for example $SLURM_JOB_ID)"
        )
    return run_id
