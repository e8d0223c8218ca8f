"""The check that a store refuses duplicate creates and stale compare-and-sets (``Store.verify_conditions``)."""

from __future__ import annotations

import contextlib
import secrets
from typing import TYPE_CHECKING

from ._errors import UnsupportedStoreError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["check_conditions", "verify_on_sibling"]


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


def verify_on_sibling(store: Store) -> None:
    """:meth:`Store.verify_conditions` of a store that does not enforce conditions itself: check a throw-away
    sibling run (a store that cannot open one is not checked)."""
    try:
        probe = store.sibling(f"fsrdzv-probe-{secrets.token_hex(6)}")
    except NotImplementedError:
        return
    try:
        check_conditions(probe, store.location)
    finally:
        with contextlib.suppress(Exception):
            probe.delete_run()
