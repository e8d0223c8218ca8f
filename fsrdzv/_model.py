"""The values of a run's shared state: node identities, the document, join requests (frozen dataclasses).

Their JSON forms are in ``_state`` (schema 1, and the dispatch by schema) and ``_compact`` (schema 2).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

__all__ = ["READS_SCHEMA", "JoinRequest", "NodeInfo", "RendezvousState", "new_node_nonce", "reads_schema"]

#: The newest document schema this fsrdzv reads. A node advertises it in its identity's nonce
#: (``"<random>.<schema>"``): every fsrdzv copies a node's identity verbatim into the document, so the
#: advertisement survives folds by versions that do not know it, and no request or record layout changes.
READS_SCHEMA: Final = 2


def new_node_nonce() -> str:
    """A fresh node nonce that advertises :data:`READS_SCHEMA` (see :func:`reads_schema`)."""
    return f"{secrets.token_hex(3)}.{READS_SCHEMA}"


@dataclass(frozen=True, order=True)
class NodeInfo:
    """A node's identity. Ordering (addr, pid, local_id, nonce) decides ranks, as torch's ``_NodeDesc`` does."""

    addr: str
    pid: int
    local_id: int
    nonce: str
    port: int = field(default=0, compare=False)
    host: str = field(default="", compare=False)

    @property
    def node_id(self) -> str:
        return f"{self.addr}_{self.pid}_{self.local_id}_{self.nonce}"

    def to_json(self) -> dict[str, Any]:
        return {
            "addr": self.addr,
            "pid": self.pid,
            "local_id": self.local_id,
            "nonce": self.nonce,
            "port": self.port,
            "host": self.host,
        }


@dataclass(frozen=True)
class RendezvousState:
    """The whole shared state of one run (immutable; the protocol returns modified copies)."""

    run_id: str
    epoch: str
    generation: int = 0
    round: int = 0
    complete: bool = False
    closed: bool = False
    #: Generation at which the current last-call period started, or None.
    last_call: int | None = None
    #: node id -> rank (0 until the round completes).
    participants: Mapping[str, int] = field(default_factory=dict)
    wait_list: tuple[str, ...] = ()
    redundancy_list: tuple[str, ...] = ()
    #: node id -> identity, for every node in any list.
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    #: (addr, port) of rank 0 for the completed round.
    master: tuple[str, int] | None = None
    #: Addresses of the completed round's participants in rank order, fixed at completion (the round's world,
    #: even after some of its participants have left to re-join).
    roster: tuple[str, ...] = ()
    #: node id -> nonce of its last folded join request (idempotent folding).
    applied: Mapping[str, str] = field(default_factory=dict)
    #: The run's settings as its first writer had them (node range, last call, timeouts; the expected roster):
    #: a node with another node range or last call fails at once. None: written by an fsrdzv without it.
    config: Mapping[str, Any] | None = None
    #: Rank 0's address candidates, host and boot id (its heartbeat's fields), with its id under ``"node"``:
    #: written by rank 0 itself (``_protocol.stamp_lead``), so that the others need not read its heartbeat record.
    #: None, or naming another node: rank 0 did not write in this round (or is an older fsrdzv); they read it.
    lead: Mapping[str, Any] | None = None

    def members(self) -> set[str]:
        return set(self.participants) | set(self.wait_list) | set(self.redundancy_list)

    def evolve(self, **changes: Any) -> RendezvousState:
        """A copy with ``changes`` (``dataclasses.replace``); the generation changes only when given."""
        return replace(self, **changes)


@dataclass(frozen=True)
class JoinRequest:
    """A node's request to join the next round, written to its own record (see :func:`encode_request_name`).

    ``leave_round`` is the round this node was a participant of when it asked again (torch's exit op).
    ``nonce`` identifies the request; the handler writes ``"<n>.<random>"`` with ``n`` counting the node's
    requests, so that an older request of the same node is never folded after a newer one (see
    :func:`nonce_order`).
    """

    node: NodeInfo
    nonce: str
    leave_round: int | None = None


def reads_schema(node: NodeInfo) -> int:
    """The newest document schema ``node`` reads: the number after the last dot of its nonce, else 1.

    Nodes of an fsrdzv from before schema 2 have nonces without a dot (6 hex digits): they read schema 1 only.
    """
    _, dot, tail = node.nonce.rpartition(".")
    if dot and 0 < len(tail) <= 3 and tail.isascii() and tail.isdigit():
        return int(tail)
    return 1
