"""``space``: (directories) free space and inodes against what a run's directory needs.

A run's directory holds ``state``, the last KEEP_LOG_ENTRIES log entries with content (older ones are truncated
to zero bytes but keep their inode, so that no generation can ever be committed twice), and about three small
records per node (heartbeat, join request, the completion announcement). Each file takes at least one block.
A full file system fails commits with ENOSPC (reported in one line; nothing committed is lost), so the doctor
warns before that: a 64 KiB tmpfs is full after three or four generations of a 4-node run.
"""

from __future__ import annotations

import math
import os
from typing import Final

from .._stores._filelog import KEEP_LOG_ENTRIES
from ._check import Check

__all__ = ["check_space", "run_bytes"]

#: Bytes of the document per member, at most (realistic host names and ports), plus its fixed part.
DOCUMENT_PER_MEMBER: Final = 372
DOCUMENT_BASE: Final = 400
#: Record files per node, and the bytes of one (its envelope included).
RECORDS_PER_NODE: Final = 3
RECORD_BYTES: Final = 300
#: Node counts the check reports the need of; the smallest must fit (else it fails), the largest should (else
#: it warns).
NODES_FAIL: Final = 4
NODES_WARN: Final = 1000
#: Inodes a run should be able to take: its files, plus one per generation it will write (truncated entries).
GENERATIONS_AHEAD: Final = 10_000


def _blocks(size: int, block: int) -> int:
    return max(1, math.ceil(size / block)) * block


def run_bytes(nodes: int, block: int = 4096) -> int:
    """Bytes a run of ``nodes`` nodes takes in a directory whose files use ``block``-byte blocks."""
    document = DOCUMENT_BASE + DOCUMENT_PER_MEMBER * nodes
    # The log's entries, ``state``, and a temporary copy while a commit publishes it.
    files = (KEEP_LOG_ENTRIES + 2) * _blocks(document, block)
    return files + nodes * RECORDS_PER_NODE * _blocks(RECORD_BYTES, block) + 6 * block


def run_inodes(nodes: int) -> int:
    return KEEP_LOG_ENTRIES + 2 + nodes * RECORDS_PER_NODE + 6 + GENERATIONS_AHEAD


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_space(directory: str) -> Check:
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return Check("space", "skip", f"cannot stat {directory}: {exc.strerror or exc}")
    block = st.f_frsize or st.f_bsize or 4096
    free, inodes = st.f_bavail * block, st.f_favail
    # Some file systems (btrfs, many FUSE ones) report no inode limit: 0 free of 0.
    unlimited = st.f_files == 0
    small, large = run_bytes(NODES_FAIL, block), run_bytes(NODES_WARN, block)
    details = {
        "free_bytes": free,
        "free_inodes": None if unlimited else inodes,
        "block_bytes": block,
        "run_bytes": {str(NODES_FAIL): small, str(NODES_WARN): large},
        "run_inodes": {str(NODES_FAIL): run_inodes(NODES_FAIL), str(NODES_WARN): run_inodes(NODES_WARN)},
        "log_entries_kept": KEEP_LOG_ENTRIES,
    }
    text = (
        f"{_mib(free)} and {'unlimited' if unlimited else f'{inodes:,}'} inodes free; a run takes about "
        f"{_mib(small)} at {NODES_FAIL} nodes, {_mib(large)} at {NODES_WARN:,} ({KEEP_LOG_ENTRIES} log entries of "
        "the document, 3 records per node) and one inode per generation"
    )
    if free < small or (not unlimited and inodes < run_inodes(NODES_FAIL)):
        return Check("space", "fail", text + ": too little for any run; commits would fail with ENOSPC", details)
    if free < large or (not unlimited and inodes < run_inodes(NODES_WARN)):
        return Check("space", "warn", text + f": not enough for {NODES_WARN:,} nodes", details)
    return Check("space", "pass", text, details)
