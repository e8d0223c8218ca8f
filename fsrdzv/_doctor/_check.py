"""The outcome of one check, and the constants every check shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["CHECKS", "DOCTOR_SCHEMA", "Check"]

#: Schema identifier of ``fsrdzv doctor --json``.
DOCTOR_SCHEMA: Final = "fsrdzv.doctor/1"
#: Every check, in the order it runs.
CHECKS: Final = ("reach", "cas", "lock", "mount", "space", "clock", "latency")
#: Clock offsets up to this many seconds pass (object stores report whole seconds).
CLOCK_TOLERANCE: Final = 2.0
#: Medians above these (s) warn: every join polls the document and folds with a CAS.
SLOW_READ: Final = 0.25
SLOW_CAS: Final = 1.0
#: Seconds the lock check waits for the other process's lock before calling it exclusive.
LOCK_PROBE: Final = 0.3
#: Seconds after which the lock check gives up on a lock holder that hangs.
LOCK_WATCHDOG: Final = 30.0


@dataclass
class Check:
    """The outcome of one check: ``verdict`` is ``pass``, ``warn``, ``fail`` or ``skip``."""

    name: str
    verdict: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "summary": self.summary, "details": self.details}
