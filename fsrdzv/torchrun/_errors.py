"""The one boundary between fsrdzv's error tree and torch's rendezvous errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError as TorchClosedError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError as TorchConnectionError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousError as TorchRendezvousError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousGracefulExitError as TorchGracefulExitError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousStateError as TorchStateError,
)
from torch.distributed.elastic.rendezvous import (
    RendezvousTimeoutError as TorchTimeoutError,
)

from .. import _errors as fe

__all__ = [
    "GracefulExit",
    "TorchConnectionError",
    "TorchGracefulExitError",
    "TorchRendezvousError",
    "to_torch",
    "torch_errors",
]


class GracefulExit(SystemExit):
    """A spare saw the run close: leave the process with status 0 (see :mod:`fsrdzv.torchrun` for why).

    ``SystemExit`` with code 0 is the one exception that torchrun's ``@record``-wrapped ``main`` turns into a normal
    return, and that no ``except Exception`` in the agent or launcher swallows or misreports.
    """

    def __init__(self, message: str) -> None:
        super().__init__(0)
        self.message = message

    def __str__(self) -> str:
        return self.message


# Order matters: the first matching fsrdzv class decides (subclasses before their bases).
_ERROR_MAP: Final[tuple[tuple[type[fe.RendezvousError], type[TorchRendezvousError]], ...]] = (
    (fe.RendezvousClosedError, TorchClosedError),
    (fe.RendezvousGracefulExitError, TorchGracefulExitError),
    (fe.RendezvousTimeoutError, TorchTimeoutError),
    (fe.RendezvousConnectionError, TorchConnectionError),
    (fe.RendezvousStateError, TorchStateError),
)


def to_torch(exc: fe.RendezvousError) -> TorchRendezvousError:
    """torch's equivalent of an fsrdzv rendezvous error, with the same message."""
    for ours, theirs in _ERROR_MAP:
        if isinstance(exc, ours):
            return theirs(str(exc))
    return TorchRendezvousError(str(exc))


@contextlib.contextmanager
def torch_errors() -> Iterator[None]:
    """Re-raise fsrdzv's rendezvous errors as torch's equivalents (the original is kept as ``__cause__``).

    The elastic agent and launcher only know torch's classes: a closed run, a timeout, a connection or state
    problem must reach them as such so that they stop, record and shut down the way they do for ``c10d``.
    """
    try:
        yield
    except fe.RendezvousError as exc:
        raise to_torch(exc) from exc
