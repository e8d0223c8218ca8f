"""Schema 2 of the rendezvous document: one member table, and everything else refers to members by index.

Schema 1 writes every node id (``addr_pid_local_nonce``) three times and every address twice more; at thousands
of nodes the document is read by every node about once a second, so its size is the job's read bandwidth. Here
each node is one row of ``members``; participants, waiting nodes and spares are the rows in that order (their
counts in ``lists``); ``applied``, ``roster`` and ``master`` name rows by index; and the part of an address from
its first dot on (``.eu-west-1.compute.internal``) is written once, in ``domains``.

The decoded value is the one schema 1 gives for the same state (same dict orders), so both schemas can alternate
within a run. Validation fails closed: every type, index and count is checked, and the caller names the object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ._errors import StateCorruptError
from ._model import NodeInfo, RendezvousState, reads_schema

__all__ = ["KIND", "SCHEMA", "decode", "decode_header", "encode", "header", "writable"]

KIND: Final = "fsrdzv.rendezvous"
SCHEMA: Final = 2
#: A member row: address head, domain index, pid, local id, nonce, port, host (0: the address head, 1: the
#: whole address, else the host name itself).
_ROW: Final = 7


def _split(addr: str) -> tuple[str, str]:
    """``(head, domain)`` with ``head + domain == addr``; IP addresses and bare names are not split."""
    head, dot, rest = addr.partition(".")
    if not dot or head.isdigit() or ":" in addr:
        return addr, ""
    return head, dot + rest


def writable(state: RendezvousState) -> bool:
    """Whether ``state`` may be written in schema 2: it names a node, every node it names reads schema 2, and
    every node is keyed by its own id (a document of a run nobody reads schema 2 in stays schema 1)."""
    if not state.nodes or not all(k == v.node_id and reads_schema(v) >= SCHEMA for k, v in state.nodes.items()):
        return False
    return state.members() <= state.nodes.keys()


def header(state: RendezvousState, schema: int) -> dict[str, Any]:
    """The fields every schema writes first, in this order: the schema, the kind, the run and its round's flags."""
    return {
        "schema": schema,
        "kind": KIND,
        "run_id": state.run_id,
        "epoch": state.epoch,
        "generation": state.generation,
        "round": state.round,
        "complete": state.complete,
        "closed": state.closed,
        "last_call": state.last_call,
    }


def encode(state: RendezvousState) -> dict[str, Any]:
    """The schema 2 form of ``state`` (check :func:`writable` first)."""
    parts = sorted(state.participants, key=lambda n: (state.participants[n], n))
    lists = [parts, sorted(state.wait_list), sorted(state.redundancy_list)]
    listed = set(parts) | set(state.wait_list) | set(state.redundancy_list)
    order = [*parts, *lists[1], *lists[2], *sorted(k for k in state.nodes if k not in listed)]
    index = {k: i for i, k in enumerate(order)}
    domains: dict[str, int] = {}
    rows: list[list[Any]] = []
    where_addr: dict[str, int] = {}
    for i, key in enumerate(order):
        node = state.nodes[key]
        head, domain = _split(node.addr)
        host: int | str = 0 if node.host == head else 1 if node.host == node.addr else node.host
        rows.append([head, domains.setdefault(domain, len(domains)), node.pid, node.local_id, node.nonce,
                     node.port, host])  # fmt: skip
        where_addr.setdefault(node.addr, i)
    ranks = [state.participants[k] for k in parts]
    doc: dict[str, Any] = {
        **header(state, SCHEMA),
        "domains": list(domains),
        "members": rows,
        "lists": [len(x) for x in lists],
        "ranks": None if ranks == list(range(len(ranks))) else ranks,
        # Application order, oldest first: trimming the history drops the oldest entries.
        "applied": [[index.get(k, k), v] for k, v in state.applied.items()],
        "master": None if state.master is None else [where_addr.get(state.master[0], state.master[0]), state.master[1]],
        "roster": [where_addr.get(a, a) for a in state.roster],
    }
    if state.config is not None:
        doc["config"] = dict(state.config)
    if state.lead is not None:
        doc["lead"] = dict(state.lead)
    return doc


def _field(doc: Mapping[str, Any], key: str, kind: type, where: str, optional: bool = False) -> Any:
    if key not in doc:
        raise StateCorruptError(f"{where}: field {key!r} is missing")
    value = doc[key]
    if value is None and optional:
        return None
    if type(value) is not kind:
        raise StateCorruptError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def decode_header(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The :func:`header` fields of either schema as :class:`RendezvousState` arguments, its ``config`` and
    ``lead`` (optional fields: readers without them ignore them, so both schemas may carry them)."""
    config = doc.get("config")
    if config is not None and type(config) is not dict:
        raise StateCorruptError(f"{where}: field 'config' has the wrong type ({type(config).__name__})")
    lead = doc.get("lead")
    if lead is not None and (type(lead) is not dict or type(lead.get("node")) is not str):
        raise StateCorruptError(f"{where}: field 'lead' must be an object naming a node")
    return {
        "run_id": _field(doc, "run_id", str, where),
        "epoch": _field(doc, "epoch", str, where),
        "generation": _field(doc, "generation", int, where),
        "round": _field(doc, "round", int, where),
        "complete": _field(doc, "complete", bool, where),
        "closed": _field(doc, "closed", bool, where),
        "last_call": _field(doc, "last_call", int, where, optional=True),
        "config": config,
        "lead": lead,
    }


def _is_int(value: object, below: int | None = None) -> bool:
    return type(value) is int and (below is None or 0 <= value < below)


def _members(rows: list[Any], domains: list[Any], where: str) -> list[NodeInfo]:
    """The member table's nodes (one loop with the checks inline: thousands of rows, decoded by every node)."""
    out = []
    count = len(domains)
    for row in rows:
        if type(row) is not list or len(row) != _ROW:
            raise StateCorruptError(f"{where}: a member row is not a list of {_ROW} fields")
        head, domain, pid, local_id, nonce, port, host = row
        if not (
            type(head) is str and type(domain) is int and 0 <= domain < count and type(pid) is int
            and type(local_id) is int and type(nonce) is str and type(port) is int
            and (type(host) is str or (type(host) is int and 0 <= host <= 1))
        ):  # fmt: skip
            raise StateCorruptError(f"{where}: a member row has fields of the wrong type")
        addr = head + domains[domain]
        out.append(NodeInfo(addr, pid, local_id, nonce, port, host if type(host) is str else addr if host else head))
    return out


def _lists(doc: Mapping[str, Any], count: int, where: str) -> tuple[int, int, int, list[int] | None]:
    lists = _field(doc, "lists", list, where)
    if len(lists) != 3 or not all(_is_int(n, count + 1) for n in lists) or sum(lists) > count:
        raise StateCorruptError(f"{where}: 'lists' must hold three member counts that fit 'members'")
    ranks = _field(doc, "ranks", list, where, optional=True)
    if ranks is not None and (len(ranks) != lists[0] or not all(_is_int(r) for r in ranks)):
        raise StateCorruptError(f"{where}: 'ranks' must hold one integer rank per participant")
    return lists[0], lists[1], lists[2], ranks


def _refs(values: list[Any], names: list[str], where: str, key: str) -> list[str]:
    """Entries that are a member index or a literal string, resolved through ``names``."""
    out = []
    for value in values:
        if type(value) is str:
            out.append(value)
        elif _is_int(value, len(names)):
            out.append(names[value])
        else:
            raise StateCorruptError(f"{where}: {key!r} must refer to members by index")
    return out


def _applied(doc: Mapping[str, Any], ids: list[str], where: str) -> dict[str, str]:
    pairs = _field(doc, "applied", list, where)
    if not all(type(p) is list and len(p) == 2 and type(p[1]) is str for p in pairs):
        raise StateCorruptError(f"{where}: 'applied' must hold [member, nonce] pairs")
    keys = _refs([p[0] for p in pairs], ids, where, "applied")
    return dict(zip(keys, (p[1] for p in pairs), strict=True))


def _master(doc: Mapping[str, Any], addrs: list[str], where: str) -> tuple[str, int] | None:
    master = _field(doc, "master", list, where, optional=True)
    if master is None:
        return None
    if len(master) != 2 or not _is_int(master[1]):
        raise StateCorruptError(f"{where}: 'master' must hold a member and a port")
    return _refs(master[:1], addrs, where, "master")[0], master[1]


def decode(doc: Mapping[str, Any], where: str) -> RendezvousState:
    """The state a schema 2 document holds. :raises StateCorruptError: naming ``where``, without a hint."""
    domains = _field(doc, "domains", list, where)
    if not all(type(d) is str for d in domains):
        raise StateCorruptError(f"{where}: 'domains' must hold strings")
    infos = _members(_field(doc, "members", list, where), domains, where)
    ids = [n.node_id for n in infos]
    if len(set(ids)) != len(ids):
        raise StateCorruptError(f"{where}: a node is listed twice")
    running, waiting, spare, ranks = _lists(doc, len(ids), where)
    addrs = [n.addr for n in infos]
    return RendezvousState(
        **decode_header(doc, where),
        participants=dict(sorted(zip(ids[:running], ranks or range(running), strict=True))),
        wait_list=tuple(ids[running : running + waiting]),
        redundancy_list=tuple(ids[running + waiting : running + waiting + spare]),
        nodes=dict(sorted(zip(ids, infos, strict=True))),
        master=_master(doc, addrs, where),
        roster=tuple(_refs(_field(doc, "roster", list, where), addrs, where, "roster")),
        applied=_applied(doc, ids, where),
    )
