"""The rendezvous document's versioned JSON form, and the per-node join request records.

JSON, never pickle: anything on shared storage can be written by anyone with access, and parsing must not run
code. Decoding validates every field's type; a newer ``schema`` raises :class:`SchemaVersionError`.

Two schemas are read. Schema 1 keys every map by node id; schema 2 (``_compact``) keeps one member table and
refers to members by index, about a quarter of the size. A document is written in schema 2 only when every node
it names reads schema 2 (:func:`reads_schema`), so a node of an older fsrdzv that is a member keeps getting
schema 1; see "Upgrading" in docs/concepts/protocol.md.

No wall-clock time is stored. The last-call period is recorded as the generation at which it started; every
observer times it on its own monotonic clock from the moment it first sees that mark (see ``_protocol``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any, Final

from . import _compact
from ._errors import SchemaVersionError, StateCorruptError, TamperedError
from ._model import READS_SCHEMA, JoinRequest, NodeInfo, RendezvousState, new_node_nonce, reads_schema

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
    "new_node_nonce",
    "nonce_order",
    "reads_schema",
    "request_owner",
    "request_record_name",
]

#: The newest document schema this fsrdzv reads and writes (it writes schema 1 while a member reads no newer).
SCHEMA_VERSION: Final = READS_SCHEMA
_KIND: Final = _compact.KIND
#: How many ``applied`` entries of nodes that left every list are kept (bounds the document).
APPLIED_HISTORY: Final = 1024
#: Prefix of a request record whose *name* carries the whole request (see :func:`encode_request_name`).
INLINE_PREFIX: Final = "i."
#: Prefix of a request record named by its node id, whose body holds the request (names too long to inline).
BODY_PREFIX: Final = "n."
#: Longest inline request name: file systems allow 255 bytes per name, and the stores may escape a few bytes.
MAX_INLINE_NAME: Final = 200


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
    """The document's bytes: schema 2 when every node ``state`` names reads it, else schema 1."""
    if _compact.writable(state):
        return json.dumps(_compact.encode(state), separators=(",", ":")).encode()
    doc: dict[str, Any] = {
        **_compact.header(state, 1),
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
    if state.lead is not None:
        doc["lead"] = dict(state.lead)
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
    if schema == _compact.SCHEMA:
        try:
            return _compact.decode(doc, where)
        except StateCorruptError as exc:
            raise StateCorruptError(f"{exc}; {hint}") from None
    try:
        participants = _expect(doc, "participants", dict, where)
        wait_list = _expect(doc, "wait_list", list, where)
        redundancy = _expect(doc, "redundancy_list", list, where)
        nodes_json = _expect(doc, "nodes", dict, where)
        applied = _expect(doc, "applied", dict, where)
        master_json = _expect(doc, "master", dict, where, optional=True)
        roster = _expect(doc, "roster", list, where)
        _check_entries(where, roster, participants, [*wait_list, *redundancy], applied)
        master = None
        if master_json is not None:
            addr, port = master_json.get("addr"), master_json.get("port")
            if not isinstance(addr, str) or not isinstance(port, int) or isinstance(port, bool):
                raise StateCorruptError(f"{where}: 'master' must hold an address and a port")
            master = (addr, port)
        nodes = {str(k): _node_from_json(v, where) for k, v in nodes_json.items()}
        state = RendezvousState(
            **_compact.decode_header(doc, where),
            participants=dict(participants),
            wait_list=tuple(wait_list),
            redundancy_list=tuple(redundancy),
            nodes=nodes,
            master=master,
            roster=tuple(roster),
            applied=dict(applied),
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
