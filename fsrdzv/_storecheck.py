"""The check that a store refuses duplicate creates and stale compare-and-sets (``Store.verify_conditions``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import UnsupportedStoreError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["check_conditions"]


def check_conditions(probe: Store, location: str) -> None:
    """Write to ``probe`` (a throw-away run): a duplicate create and a write on a stale token must both fail.

    :raises UnsupportedStoreError: one of them was accepted (``location`` names the store in the message).
    """
    first = probe.compare_and_set(b"probe-1", None)
    second = probe.compare_and_set(b"probe-2", None)
    stale_ok = False
    if first.won and first.snapshot is not None and not second.won:
        newer = probe.compare_and_set(b"probe-3", first.snapshot.token)
        stale_ok = newer.won and probe.compare_and_set(b"probe-4", first.snapshot.token).won
    if not first.won or second.won or stale_ok:
        raise UnsupportedStoreError(
            f"{location} ignores conditional writes (a duplicate create or a stale compare-and-set was accepted); "
            "fsrdzv would lose updates there. Use a store that honours them (check it with 'fsrdzv doctor')"
        )
