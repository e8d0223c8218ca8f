"""Exit statuses of the ``fsrdzv`` command and the one-line error that carries one."""

from __future__ import annotations

from typing import Final

from .._errors import ConfigurationError, RendezvousConnectionError, RendezvousError, RendezvousStateError

__all__ = [
    "EXIT_CODES",
    "EXIT_CORRUPT",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_NO_COMMAND",
    "EXIT_OK",
    "EXIT_STORAGE",
    "EXIT_USAGE",
    "CliError",
    "exit_code_for",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_STORAGE: Final = 3
EXIT_CORRUPT: Final = 4
EXIT_NOT_FOUND: Final = 5
EXIT_NO_COMMAND: Final = 127
EXIT_INTERRUPTED: Final = 130

#: The documented exit statuses (also in ``fsrdzv --help`` and docs/cli-json-schema.md).
EXIT_CODES: Final = {
    EXIT_OK: "success",
    EXIT_FAILURE: "failure: a doctor check failed, a join timed out, the run is closed, an internal error",
    EXIT_USAGE: "usage or configuration error: bad option or value, endpoint, run id; reset without --force",
    EXIT_STORAGE: "storage unreachable or failing: network, permissions, missing directory, disk full",
    EXIT_CORRUPT: "corrupt or incompatible state: unreadable document, newer schema, wrong HMAC",
    EXIT_NOT_FOUND: "no such run at the endpoint",
    EXIT_NO_COMMAND: "run: the command was not found or is not executable",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class CliError(Exception):
    """A user-facing failure: one line, an exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    """The documented exit status for an exception."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, RendezvousConnectionError):
        return EXIT_STORAGE
    if isinstance(exc, RendezvousStateError):
        return EXIT_CORRUPT
    if isinstance(exc, RendezvousError):
        return EXIT_FAILURE
    if isinstance(exc, OSError):
        return EXIT_STORAGE  # an SDK error that escaped its store's translation: almost always the storage
    return EXIT_FAILURE
