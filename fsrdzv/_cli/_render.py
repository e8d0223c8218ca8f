"""Human-readable output: tables, ages, the status view. The JSON objects are built in :mod:`fsrdzv._status`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["human", "print_json", "render_list", "render_status", "table"]


def human(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def heartbeat_text(hb: Mapping[str, Any]) -> str:
    if not hb["present"]:
        return "missing"
    age = human(hb["age_seconds"])
    return f">={age}" if hb["age_is_lower_bound"] else age


def _deferral_lines(scale_up: Mapping[str, Any] | None) -> list[str]:
    """The waiting nodes that scale_up_at=safe_point holds back, and since when (the deferring node's clock)."""
    if not scale_up:
        return []
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(scale_up["since"]))
    by = time.strftime("%H:%M:%S", time.localtime(scale_up["since"] + scale_up["max_delay_seconds"]))
    ids = ", ".join(d["node_id"] for d in scale_up["deferred"])
    return [
        f"  deferred until a safe point of every participant (scale_up_at=safe_point) since {since}, "
        f"admitted by {by} at the latest (clock of rank 0, {scale_up['deferred_by']}): {ids}"
    ]


def _expected_lines(expected: Mapping[str, Any] | None) -> list[str]:
    """The expected nodes (``--expect``, Slurm's node list) that no member runs on, and when each was seen."""
    if not expected or not expected["missing"]:
        return []
    named = [
        f"{m['name']} ({'never seen' if m['heartbeat'] is None else 'heartbeat ' + heartbeat_text(m['heartbeat'])})"
        for m in expected["missing"]
    ]
    return ["", f"expected, not in the run ({len(named)} of {len(expected['nodes'])}): {', '.join(named)}"]


def render_status(doc: Mapping[str, Any]) -> str:
    """The human-readable form of an ``fsrdzv.status/1`` object."""
    head = f"run {doc['run_id']!r} at {doc['endpoint']}"
    if not doc["exists"]:
        lines = [head, "  no document yet (a node is creating it, or the run was reset)"]
    else:
        phase = "complete" if doc["complete"] else "forming"
        if not doc["complete"] and doc["last_call"] is not None:
            phase += f" (last call since generation {doc['last_call']})"
        parts = [
            f"round {doc['round']}",
            phase,
            "CLOSED" if doc["closed"] else "open",
            f"generation {doc['generation']}",
        ]
        if doc["master"]:
            parts.append(f"master {doc['master']['addr']}:{doc['master']['port']}")
        lines = [head, "  " + " | ".join(parts)]
    lines.append(
        "  heartbeat = seconds since this observer saw the node's record change "
        f"(watched {doc['observed_seconds']:.1f}s; '>=': unchanged while watched)"
    )

    def section(title: str, nodes: Sequence[Mapping[str, Any]], ranked: bool) -> None:
        lines.append("")
        if not nodes:
            lines.append(f"{title} (0): none")
            return
        lines.append(f"{title} ({len(nodes)})")
        headers = (["RANK"] if ranked else []) + ["ADDRESS", "HOST", "PID", "HEARTBEAT", "NODE ID"]
        rows = []
        for n in nodes:
            row = [] if not ranked else ["-" if n.get("rank") is None else str(n["rank"])]
            row += [str(n.get("addr") or "?"), str(n.get("host") or "?"), str(n.get("pid") or "?")]
            row += [heartbeat_text(n["heartbeat"]), n["node_id"]]
            rows.append(row)
        lines.append(table(headers, rows))

    section("participants", doc["participants"], ranked=True)
    section("waiting", doc["waiting"], ranked=False)
    lines.extend(_deferral_lines(doc.get("scale_up")))
    lines.extend(_expected_lines(doc.get("expected")))
    section("spares", doc["spares"], ranked=False)
    if doc["unlisted"]:
        lines.append("")
        lines.append(f"not in the document ({len(doc['unlisted'])}): joining, or records left by nodes that are gone")
        rows = [
            [heartbeat_text(n["heartbeat"]), "yes" if n["join_request"] else "no", n["node_id"]]
            for n in doc["unlisted"]
        ]
        lines.append(table(["HEARTBEAT", "JOIN REQUEST", "NODE ID"], rows))
    return "\n".join(lines) + "\n"


def render_list(runs: Sequence[Mapping[str, Any]]) -> str:
    """The table of ``fsrdzv list`` (without the per-run error lines)."""
    rows = [
        [
            r["run_id"],
            r["state"],
            "-" if r["round"] is None else str(r["round"]),
            str(r["participants"]),
            str(r["waiting"]),
            str(r["spares"]),
            str(r["heartbeat_records"]),
            human(r["idle_seconds"]),
        ]
        for r in runs
    ]
    return (
        table(["RUN ID", "STATE", "ROUND", "PARTICIPANTS", "WAITING", "SPARES", "HEARTBEATS", "IDLE"], rows, "") + "\n"
    )
