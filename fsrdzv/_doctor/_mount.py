"""``mount``: the rules on mount options (pure functions of ``/proc/self/mountinfo`` text) and the check."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ._check import Check

__all__ = ["MountEntry", "check_mount", "find_mount", "mount_findings", "parse_mountinfo"]


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo`` (proc(5))."""

    mount_point: str
    fstype: str
    source: str
    options: tuple[str, ...]
    super_options: tuple[str, ...]

    def all_options(self) -> tuple[str, ...]:
        return (*self.options, *self.super_options)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse mountinfo text; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        entries.append(
            MountEntry(
                mount_point=_unescape(fields[4]),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                options=tuple(fields[5].split(",")),
                super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
            )
        )
    return entries


def find_mount(entries: Sequence[MountEntry], path: str) -> MountEntry | None:
    """The mount holding ``path``: the longest mount point that is a prefix; the last such line wins (it shadows)."""
    best: MountEntry | None = None
    for entry in entries:
        mp = entry.mount_point.rstrip("/") or "/"
        inside = path == mp or path.startswith(mp if mp.endswith("/") else mp + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = entry
    return best


def mount_findings(entry: MountEntry) -> list[tuple[str, str]]:
    """``(verdict, reason)`` for every option of ``entry`` that matters to fsrdzv (empty: nothing to report)."""
    keys = {o.partition("=")[0]: o.partition("=")[2] for o in entry.all_options()}
    fstype = entry.fstype
    out: list[tuple[str, str]] = []
    if fstype.startswith("fuse") and fstype not in ("fusectl",):
        out.append(
            (
                "fail",
                f"{fstype} is a FUSE file system: unless its daemon implements flock, locks are node-local "
                "(silently), and link(2)/rename atomicity across nodes is up to the daemon; use the object store "
                "directly (s3://, gs://, az://) or a kernel-mounted shared file system",
            )
        )
    if fstype in ("nfs", "nfs4"):
        out.extend(_nfs_findings(keys))
    if fstype == "lustre":
        out.extend(_lustre_findings(keys))
    return out


def _nfs_findings(keys: dict[str, str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if "nolock" in keys:
        out.append(("fail", "nolock: locks are local to each node and exclude nothing across nodes"))
    if keys.get("local_lock", "none") != "none":
        out.append(("fail", f"local_lock={keys['local_lock']}: locks of that kind are local to each node"))
    if "nocto" in keys:
        out.append(("fail", "nocto: close-to-open consistency is off, so a reader can see an old document or record"))
    if "noac" in keys:
        out.append(("warn", "noac: no attribute cache; correct, but every operation goes to the server (slow)"))
    for key in ("actimeo", "acregmin", "acregmax", "acdirmin", "acdirmax"):
        if key in keys:
            out.append(
                (
                    "warn",
                    f"{key}={keys[key]}: cached attributes delay the time other nodes' new records show up in "
                    "a listing (fsrdzv re-opens files to read them, so contents are fresh)",
                )
            )
    if keys.get("lookupcache") in ("all", "positive"):
        out.append(
            (
                "warn",
                f"lookupcache={keys['lookupcache']}: cached lookups can hide files other nodes just created "
                "or removed for a while; lookupcache=none avoids it",
            )
        )
    if "soft" in keys:
        out.append(("warn", "soft: a slow server makes operations fail with EIO instead of waiting; prefer hard"))
    return out


def _lustre_findings(keys: dict[str, str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if "localflock" in keys:
        out.append(("fail", "localflock: Lustre locks are local to each client and exclude nothing across nodes"))
    if "noflock" in keys:
        out.append(("fail", "noflock: Lustre refuses flock (ENOSYS); writers are not serialised"))
    if "flock" not in keys and "localflock" not in keys and "noflock" not in keys:
        out.append(("warn", "no flock option: the lock mode is the site default; ask for the 'flock' option"))
    return out


def _resolve(path: str) -> str:
    """``path`` with symlinks resolved in the part that exists (the endpoint's last levels may not exist yet)."""
    path = os.path.abspath(os.path.expanduser(path))
    head, rest = path, ""
    while not os.path.exists(head):
        parent, name = os.path.split(head)
        if parent == head:
            break
        head, rest = parent, os.path.join(name, rest) if rest else name
    return os.path.join(os.path.realpath(head), rest) if rest else os.path.realpath(head)


def _mountinfo_text(mountinfo: str | None) -> tuple[str, str | None, str | None]:
    """``(where, text, error)``: ``mountinfo`` is a path (default ``/proc/self/mountinfo``) or the text itself."""
    if mountinfo is not None and "\n" in mountinfo:
        return "the given mountinfo", mountinfo, None
    path = mountinfo or "/proc/self/mountinfo"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return path, f.read(), None
    except OSError as exc:
        return path, None, exc.strerror


def check_mount(root: str, mountinfo: str | None = None) -> Check:
    path, text, error = _mountinfo_text(mountinfo)
    if text is None:
        return Check("mount", "skip", f"cannot read {path} ({error}); mount options not checked")
    target = _resolve(root)
    entry = find_mount(parse_mountinfo(text), target)
    if entry is None:
        return Check("mount", "skip", f"no mount in {path} holds {target}")
    findings = mount_findings(entry)
    details = {
        "mountinfo": path,
        "path": target,
        "mount_point": entry.mount_point,
        "fstype": entry.fstype,
        "source": entry.source,
        "options": list(entry.all_options()),
        "findings": [{"verdict": v, "reason": r} for v, r in findings],
    }
    where = f"{entry.mount_point} ({entry.fstype} from {entry.source})"
    bad = [r for v, r in findings if v == "fail"]
    if bad:
        return Check("mount", "fail", f"{where}: " + "; ".join(bad), details)
    warned = [r for v, r in findings if v == "warn"]
    if warned:
        return Check("mount", "warn", f"{where}: " + "; ".join(warned), details)
    return Check("mount", "pass", f"{where}: no option that breaks locking or caching", details)
