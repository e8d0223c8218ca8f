"""The rendezvous document: a frozen value, its versioned JSON form, and the per-node request/heartbeat records.

JSON, never pickle: anything on shared storage can be written by anyone with access, and parsing must not run
code. Decoding validates every field's type; a newer ``schema`` raises :class:`SchemaVersionError`.

No wall-clock time is stored. The last-call period is recorded as the generation at which it started; every
observer times it on its own monotonic clock from the moment it first sees that mark (see ``_protocol``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from ._errors import SchemaVersionError, StateCorruptError, TamperedError

__all__ = [
    "SCHEMA_VERSION",
    "JoinRequest",
    "NodeInfo",
    "RendezvousState",
    "decode_request",
    "decode_request_name",
    "decode_state",
    "encode_request",
    "encode_request_name",
    "encode_state",
    "nonce_order",
    "request_owner",
    "request_record_name",
]

#: Version of the document schema this fsrdzv writes and the newest it reads.
SCHEMA_VERSION: Final = 1
_KIND: Final = "fsrdzv.rendezvous"
#: How many ``applied`` entries of nodes that left every list are kept (bounds the document).
APPLIED_HISTORY: Final = 1024
#: Prefix of a request record whose *name* carries the whole request (see :func:`encode_request_name`).
INLINE_PREFIX: Final = "i."
#: Prefix of a request record named by its node id, whose body holds the request (names too long to inline).
BODY_PREFIX: Final = "n."
#: Longest inline request name: file systems allow 255 bytes per name, and the stores may escape a few bytes.
MAX_INLINE_NAME: Final = 200


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


# -- JSON ------------------------------------------------------------------------------------------------------


def _node_from_json(value: object, where: str) -> NodeInfo:
    if not isinstance(value, dict):
        raise StateCorruptError(f"{where}: a node entry is not an object")
    try:
        addr, pid, local_id, nonce = value["addr"], value["pid"], value["local_id"], value["nonce"]
        port, host = value.get("port", 0), value.get("host", "")
    except KeyError as exc:
        raise StateCorruptError(f"{where}: a node entry lacks {exc.args[0]!r}") from None
    if not (
        isinstance(addr, str)
        and isinstance(pid, int)
        and isinstance(local_id, int)
        and isinstance(nonce, str)
        and isinstance(port, int)
        and isinstance(host, str)
    ) or any(isinstance(v, bool) for v in (pid, local_id, port)):
        raise StateCorruptError(f"{where}: a node entry has fields of the wrong type")
    return NodeInfo(addr, pid, local_id, nonce, port, host)


def encode_state(state: RendezvousState) -> bytes:
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "kind": _KIND,
        "run_id": state.run_id,
        "epoch": state.epoch,
        "generation": state.generation,
        "round": state.round,
        "complete": state.complete,
        "closed": state.closed,
        "last_call": state.last_call,
        "participants": dict(sorted(state.participants.items())),
        "wait_list": sorted(state.wait_list),
        "redundancy_list": sorted(state.redundancy_list),
        "master": None if state.master is None else {"addr": state.master[0], "port": state.master[1]},
        "roster": list(state.roster),
        "nodes": {k: v.to_json() for k, v in sorted(state.nodes.items())},
        # Application order, oldest first (not sorted): trimming the history drops the oldest entries.
        "applied": dict(state.applied),
    }
    if state.config is not None:
        doc["config"] = dict(state.config)  # schema 1 readers ignore fields they do not know
    return json.dumps(doc, separators=(",", ":")).encode()


def _expect(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    if key not in doc:
        raise StateCorruptError(f"{where}: field {key!r} is missing")
    value = doc[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise StateCorruptError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _check_entries(
    where: str, roster: list[Any], participants: dict[Any, Any], listed: list[Any], applied: dict[Any, Any]
) -> None:
    if not all(isinstance(x, str) for x in roster):
        raise StateCorruptError(f"{where}: 'roster' must hold addresses")
    if not all(type(v) is int for v in participants.values()):
        raise StateCorruptError(f"{where}: 'participants' must map node ids to integer ranks")
    if not all(isinstance(x, str) for x in listed):
        raise StateCorruptError(f"{where}: 'wait_list' and 'redundancy_list' must hold node ids")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in applied.items()):
        raise StateCorruptError(f"{where}: 'applied' must map node ids to nonces")


def decode_state(data: bytes, where: str) -> RendezvousState:
    """Parse and validate a document. ``where`` names the object in error messages."""
    hint = "run 'fsrdzv status' to inspect it and 'fsrdzv reset --force' to replace it"
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateCorruptError(f"{where} is not valid JSON ({exc}); {hint}") from None
    if not isinstance(doc, dict) or doc.get("kind") != _KIND:
        raise StateCorruptError(f"{where} is not an fsrdzv rendezvous document; {hint}")
    schema = doc.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise StateCorruptError(f"{where} has no valid schema version; {hint}")
    if schema > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} uses schema {schema}, newer than the {SCHEMA_VERSION} this fsrdzv understands; "
            "upgrade fsrdzv on this node (all nodes of a job must run compatible versions)"
        )
    try:
        participants = _expect(doc, "participants", dict, where)
        wait_list = _expect(doc, "wait_list", list, where)
        redundancy = _expect(doc, "redundancy_list", list, where)
        nodes_json = _expect(doc, "nodes", dict, where)
        applied = _expect(doc, "applied", dict, where)
        master_json = _expect(doc, "master", dict, where, optional=True)
        last_call = _expect(doc, "last_call", int, where, optional=True)
        roster = _expect(doc, "roster", list, where)
        config = doc.get("config")
        if config is not None and not isinstance(config, dict):
            raise StateCorruptError(f"{where}: field 'config' has the wrong type ({type(config).__name__})")
        _check_entries(where, roster, participants, [*wait_list, *redundancy], applied)
        master = None
        if master_json is not None:
            addr, port = master_json.get("addr"), master_json.get("port")
            if not isinstance(addr, str) or not isinstance(port, int) or isinstance(port, bool):
                raise StateCorruptError(f"{where}: 'master' must hold an address and a port")
            master = (addr, port)
        nodes = {str(k): _node_from_json(v, where) for k, v in nodes_json.items()}
        state = RendezvousState(
            run_id=_expect(doc, "run_id", str, where),
            epoch=_expect(doc, "epoch", str, where),
            generation=_expect(doc, "generation", int, where),
            round=_expect(doc, "round", int, where),
            complete=_expect(doc, "complete", bool, where),
            closed=_expect(doc, "closed", bool, where),
            last_call=last_call,
            participants=dict(participants),
            wait_list=tuple(wait_list),
            redundancy_list=tuple(redundancy),
            nodes=nodes,
            master=master,
            roster=tuple(roster),
            applied=dict(applied),
            config=config,
        )
    except StateCorruptError as exc:
        raise StateCorruptError(f"{exc}; {hint}") from None
    members = [*state.participants, *state.wait_list, *state.redundancy_list]
    if len(members) != len(set(members)) or not set(members) <= set(state.nodes):
        raise StateCorruptError(f"{where}: a node is listed twice or has no identity entry; {hint}")
    return state


def encode_request(request: JoinRequest) -> bytes:
    return json.dumps(
        {"node": request.node.to_json(), "nonce": request.nonce, "leave_round": request.leave_round},
        separators=(",", ":"),
    ).encode()


def decode_request(data: bytes, where: str) -> JoinRequest:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise TypeError
        node = _node_from_json(doc["node"], where)
        nonce = doc["nonce"]
        leave_round = doc.get("leave_round")
        if not isinstance(nonce, str) or not (leave_round is None or isinstance(leave_round, int)):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise StateCorruptError(f"{where} is not a valid join request") from None
    return JoinRequest(node, nonce, leave_round)


def nonce_order(nonce: str) -> int | None:
    """The sequence number of a handler-made nonce ``"<n>.<random>"``, or None for any other nonce."""
    head, sep, _ = nonce.partition(".")
    if not sep or not (head.isascii() and head.isdigit()) or len(head) > 18:
        return None
    return int(head)


def encode_request_name(request: JoinRequest, mac: Callable[[str], str | None]) -> str | None:
    """The record name that carries ``request`` itself, or None when it would be too long for a file name.

    With the request in its name, one listing of the request records is all the folding node has to read: no
    read per request (at 1,000 nodes one S3 LIST page instead of 1,000 GETs). ``mac(text)`` signs the name
    when the job has a secret (None otherwise). Longer requests (very long host names) fall back to a record
    named by the node id whose body is read.
    """
    node = request.node
    fields = [node.addr, node.pid, node.local_id, node.nonce, node.port, node.host, request.nonce, request.leave_round]
    text = INLINE_PREFIX + base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode()
    text = text.rstrip("=")
    tag = mac(text)
    if tag is not None:
        text += "." + tag
    return text if len(text) <= MAX_INLINE_NAME else None


def request_record_name(request: JoinRequest, mac: Callable[[str], str | None]) -> str:
    """The name of ``request``'s record: the inline name, or ``"n.<node id>"`` (the body holds the request)."""
    return encode_request_name(request, mac) or BODY_PREFIX + request.node.node_id


def request_owner(name: str) -> str:
    """The node id a request record name belongs to, without checking signatures (for clean-up and display)."""
    if name.startswith(BODY_PREFIX):
        return name[len(BODY_PREFIX) :]
    try:
        request = decode_request_name(name, lambda _: None)
    except StateCorruptError:
        return name
    return name if request is None else request.node.node_id


def decode_request_name(name: str, mac: Callable[[str], str | None]) -> JoinRequest | None:
    """Inverse of :func:`encode_request_name`; None if ``name`` is not an inline request name.

    :raises StateCorruptError: the name looks like an inline request but does not decode to one.
    :raises TamperedError: a job secret is set and the name's signature is missing or wrong.
    """
    if not name.startswith(INLINE_PREFIX):
        return None
    body, _, tag = name[len(INLINE_PREFIX) :].partition(".")
    expected = mac(INLINE_PREFIX + body)
    if expected is not None and not hmac.compare_digest(tag.encode(), expected.encode()):
        raise TamperedError(f"join request {name[:40]!r}... is not signed with this job's secret; it was ignored")
    try:
        fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        addr, pid, local_id, node_nonce, port, host, nonce, leave = fields
        ints = (pid, local_id, port)
        if not (
            all(isinstance(x, str) for x in (addr, node_nonce, host, nonce))
            and all(type(x) is int for x in ints)
            and (leave is None or type(leave) is int)
        ):
            raise TypeError
    except (ValueError, TypeError, UnicodeDecodeError, binascii.Error):
        raise StateCorruptError(f"join request name {name[:40]!r}... does not decode to a join request") from None
    return JoinRequest(NodeInfo(addr, pid, local_id, node_nonce, port, host), nonce, leave)
