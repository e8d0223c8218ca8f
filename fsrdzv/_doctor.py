"""``fsrdzv doctor``: does this endpoint give what the rendezvous relies on? One verdict per check.

Checks, in order (each one ``pass``, ``warn``, ``fail`` or ``skip``; any ``fail`` makes the command exit 1):

``reach``    create, read and delete a scratch run (``fsrdzv-doctor-<random>``, removed at the end).
``cas``      real compare-and-set: writers on separate store handles race conditional writes behind a barrier,
             for a create-if-absent and for several updates of one token; exactly one must win each race, the
             stored document must be the winner's, and a stale token must be refused.
``lock``     (directories) a lock held by another process must exclude this one's descriptor, and be free again
             once released. The same lock the store uses, so ``lock=false`` shows up as a failure here.
``mount``    (directories) the mount options of the endpoint's file system, from ``/proc/self/mountinfo``:
             options that make locks node-local (NFS ``nolock``/``local_lock``, Lustre ``localflock``/
             ``noflock``, FUSE) or that defeat close-to-open consistency (``nocto``) fail; attribute and lookup
             caching (``actimeo``, ``noac``, ``lookupcache``) and ``soft`` mounts warn.
``clock``    offset between this host's wall clock and the storage's: a file's mtime for directories, an object's
             LastModified for object stores. fsrdzv never compares clocks for liveness, so this only warns: it
             skews the idle ages ``list`` and ``gc`` show.
``latency``  median and p90 of read, CAS and record listing on the scratch run; slow storage only warns.

Same-host tests cannot prove cross-node behaviour (two NFS clients); that is why the mount options are read too.

Test hooks, not user options: ``FSRDZV_MOUNTINFO`` (or the hidden ``--mountinfo``) names the mountinfo file, and
``FSRDZV_DOCTOR_FAULT=ignore-conditions`` wraps every store the doctor opens in
``fsrdzv.testing.FaultyStore(ignore_conditions=True)``, a store that lies about CAS.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ._errors import ConfigurationError
from ._status import fsspec_options, info_mtime
from ._store import Store
from ._stores import open_store, split_endpoint

__all__ = [
    "CHECKS",
    "DOCTOR_SCHEMA",
    "Check",
    "MountEntry",
    "find_mount",
    "mount_findings",
    "parse_mountinfo",
    "run_doctor",
]

#: Schema identifier of ``fsrdzv doctor --json``.
DOCTOR_SCHEMA: Final = "fsrdzv.doctor/1"
#: Every check, in the order it runs.
CHECKS: Final = ("reach", "cas", "lock", "mount", "clock", "latency")
#: Clock offsets up to this many seconds pass (object stores report whole seconds).
CLOCK_TOLERANCE: Final = 2.0
#: Medians above these (s) warn: every join polls the document and folds with a CAS.
SLOW_READ: Final = 0.25
SLOW_CAS: Final = 1.0
#: Seconds the lock check waits for the other process's lock before calling it exclusive.
LOCK_PROBE: Final = 0.3
#: Seconds after which the lock check gives up on a lock holder that hangs.
LOCK_WATCHDOG: Final = 30.0

_FAULT_ENV: Final = "FSRDZV_DOCTOR_FAULT"
_MOUNTINFO_ENV: Final = "FSRDZV_MOUNTINFO"


@dataclass
class Check:
    """The outcome of one check: ``verdict`` is ``pass``, ``warn``, ``fail`` or ``skip``."""

    name: str
    verdict: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "summary": self.summary, "details": self.details}


# -- opening stores ----------------------------------------------------------------------------------------------


def _opener(endpoint: str, storage_options: Mapping[str, Any], secret: bytes | None) -> Callable[[str], Store]:
    fault = os.environ.get(_FAULT_ENV, "")
    if fault not in ("", "ignore-conditions"):
        raise ConfigurationError(f"{_FAULT_ENV}={fault!r} is not a known fault (test hook: 'ignore-conditions')")

    def open_one(run_id: str) -> Store:
        store = open_store(endpoint, run_id, storage_options=dict(storage_options), secret=secret)
        if fault:
            from .testing import FaultyStore

            return FaultyStore(store, ignore_conditions=True)
        return store

    return open_one


# -- cas -----------------------------------------------------------------------------------------------------------


def _race(stores: Sequence[Store], payloads: Sequence[bytes], token: str | None) -> list[bool]:
    """Every store tries ``compare_and_set(payload, token)`` at the same moment; return who won."""
    barrier = threading.Barrier(len(stores))
    won = [False] * len(stores)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            won[i] = stores[i].compare_and_set(payloads[i], token).won
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,), name=f"fsrdzv-doctor-writer-{i}") for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return won


def check_cas(open_one: Callable[[str], Store], run_id: str, writers: int, rounds: int) -> Check:
    stores = [open_one(run_id) for _ in range(writers)]
    reader = open_one(run_id)
    try:
        reader.delete_run()
        outcomes: list[int] = []
        problems: list[str] = []
        token: str | None = None
        old_tokens: list[str] = []
        for race in range(rounds + 1):
            payloads = [f"doctor race {race} writer {i} {secrets.token_hex(4)}".encode() for i in range(writers)]
            won = _race(stores, payloads, token)
            winners = [i for i, w in enumerate(won) if w]
            outcomes.append(len(winners))
            snap = reader.read()
            what = "create-if-absent" if race == 0 else f"update {race}"
            if len(winners) != 1:
                problems.append(f"{what}: {len(winners)} of {writers} conditional writes won")
            elif snap is None or snap.data != payloads[winners[0]]:
                problems.append(f"{what}: the stored document is not the winner's write")
            if snap is None:
                break
            if token is not None:
                old_tokens.append(token)
            token = snap.token
        stale_won = False
        if old_tokens:
            stale_won = reader.compare_and_set(b"doctor stale write", old_tokens[-1]).won
            if stale_won:
                problems.append("a write with a stale token was accepted")
        details = {
            "writers": writers,
            "races": len(outcomes),
            "winners": outcomes,
            "stale_token_refused": not stale_won,
        }
        if problems:
            return Check(
                "cas",
                "fail",
                "compare-and-set is not atomic: "
                + "; ".join(problems[:3])
                + ". Nodes would lose updates; use a store with conditional writes (see the docs' support matrix)",
                details,
            )
        return Check(
            "cas",
            "pass",
            f"{len(outcomes)} races of {writers} writers: exactly one winner each time; stale token refused",
            details,
        )
    finally:
        for store in [*stores, reader]:
            store.close()


# -- lock ----------------------------------------------------------------------------------------------------------

#: The other process of the lock check: take the lock, say so, hold it until told to let go.
_LOCK_HOLDER: Final = (
    "import sys\n"
    "path, mode = sys.argv[1], sys.argv[2]\n"
    "lock = None\n"
    "if mode == 'filelock':\n"
    "    import filelock\n"
    "    lock = filelock.FileLock(path, timeout=10)\n"
    "    lock.acquire()\n"
    "sys.stdout.write('held\\n')\n"
    "sys.stdout.flush()\n"
    "sys.stdin.readline()\n"
    "if lock is not None:\n"
    "    lock.release()\n"
)


@contextlib.contextmanager
def _try_lock(path: str, mode: str, timeout: float) -> Iterator[bool]:
    """Yield whether this process got the lock within ``timeout`` (a no-op lock always "gets" it)."""
    if mode != "filelock":
        yield True
        return
    import filelock

    lock = filelock.FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def check_lock(store: Store) -> Check:
    lock_path = getattr(store, "lock_path", None)
    if not isinstance(lock_path, str):
        return Check("lock", "skip", "not a directory endpoint: object stores need no lock (CAS only)")
    mode = "filelock" if getattr(store, "use_lock", True) else "none"
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, lock_path, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    # A lock call can hang for good on a broken NFS lock manager (NFSv3 without statd): never wait forever.
    watchdog = threading.Timer(LOCK_WATCHDOG, holder.kill)
    watchdog.start()
    try:
        line = holder.stdout.readline()
        if line.strip() != b"held":
            err = holder.communicate(timeout=10)[1].decode(errors="replace").strip().splitlines()
            return Check(
                "lock", "fail", f"another process could not take the lock on {lock_path}: {err[-1] if err else '?'}"
            )
        with _try_lock(lock_path, mode, LOCK_PROBE) as got:
            excluded = not got
        holder.stdin.write(b"release\n")
        holder.stdin.flush()
        holder.wait(timeout=10)
        with _try_lock(lock_path, mode, 5.0) as got:
            free_again = got
    finally:
        watchdog.cancel()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for stream in (holder.stdin, holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
    details = {"lock_file": lock_path, "lock": mode, "excluded": excluded, "free_after_release": free_again}
    if not excluded:
        why = (
            "the storage option lock=false turns the store's lock off"
            if mode == "none"
            else "the file system does not honour flock between descriptors"
        )
        return Check(
            "lock",
            "fail",
            f"a second descriptor took the lock on {lock_path} while another process held it: {why}. "
            "Commits stay atomic through link(2), but writers are no longer serialised",
            details,
        )
    if not free_again:
        return Check("lock", "fail", f"the lock on {lock_path} could not be taken even after it was released", details)
    return Check("lock", "pass", "a lock held by another process excluded this one and was free after release", details)


# -- mount ---------------------------------------------------------------------------------------------------------


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
    out: list[tuple[str, str]] = []
    options = entry.all_options()
    fstype = entry.fstype
    keys = {o.partition("=")[0]: o.partition("=")[2] for o in options}
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
        if "nolock" in keys:
            out.append(("fail", "nolock: locks are local to each node and exclude nothing across nodes"))
        if keys.get("local_lock", "none") != "none":
            out.append(("fail", f"local_lock={keys['local_lock']}: locks of that kind are local to each node"))
        if "nocto" in keys:
            out.append(
                ("fail", "nocto: close-to-open consistency is off, so a reader can see an old document or record")
            )
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
    if fstype == "lustre":
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


def check_mount(root: str, mountinfo: str | None) -> Check:
    path = mountinfo or os.environ.get(_MOUNTINFO_ENV) or "/proc/self/mountinfo"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        return Check("mount", "skip", f"cannot read {path} ({exc.strerror}); mount options not checked")
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


# -- clock ---------------------------------------------------------------------------------------------------------


def _clock_verdict(offset: float, uncertainty: float, basis: str) -> Check:
    details = {"offset_seconds": round(offset, 3), "uncertainty_seconds": round(uncertainty, 3), "basis": basis}
    text = f"storage clock {offset:+.3f}s from this host (±{uncertainty:.3f}s, {basis})"
    if abs(offset) > CLOCK_TOLERANCE + uncertainty:
        return Check(
            "clock",
            "warn",
            text + ": liveness is unaffected (fsrdzv never compares clocks), but idle ages in list/gc are off by "
            "that much; check NTP on this host and the storage server",
            details,
        )
    return Check("clock", "pass", text, details)


def check_clock_directory(directory: str) -> Check:
    probe = os.path.join(directory, f".clock-probe-{secrets.token_hex(4)}")
    before = time.time()
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"clock probe")
        os.fsync(fd)
        after = time.time()
        mtime = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    # The file system stamps with a coarse clock (a few ms), hence the uncertainty floor.
    return _clock_verdict(mtime - (before + after) / 2, max((after - before) / 2, 0.01), "file mtime")


def check_clock_object(endpoint: str, storage_options: Mapping[str, Any], run_id: str) -> Check:
    scheme, rest = split_endpoint(endpoint)
    try:
        import fsspec

        fs = fsspec.filesystem(scheme, **fsspec_options(storage_options))
    except Exception as exc:  # noqa: BLE001 - the clock check is optional; report why it could not run
        return Check("clock", "skip", f"cannot open {scheme}:// through fsspec to read object times: {exc}")
    probe = f"{rest}/{run_id}/clock-probe"
    try:
        before = time.time()
        fs.pipe_file(probe, b"clock probe")
        after = time.time()
        info = fs.info(probe)
    except Exception as exc:  # noqa: BLE001 - same
        return Check("clock", "skip", f"cannot write or stat a probe object {probe}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            fs.rm_file(probe)
    mtime = info_mtime(info)
    if mtime is None:
        return Check("clock", "skip", "the object store reports no modification time")
    # LastModified has one-second resolution (truncated), so the object can look up to 1 s older than it is.
    return _clock_verdict(mtime - (before + after) / 2 + 0.5, (after - before) / 2 + 0.5, "object LastModified")


# -- latency -------------------------------------------------------------------------------------------------------


def _timed(samples: int, op: Callable[[], object]) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        op()
        out.append(time.perf_counter() - start)
    return out


def _stats(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {"median_ms": round(statistics.median(ordered) * 1000, 2), "p90_ms": round(p90 * 1000, 2)}


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def check_latency(store: Store, samples: int) -> Check:
    snap = store.read()
    token = None if snap is None else snap.token
    store.put_record("hb", "doctor", b'{"n":1}')

    def cas() -> None:
        nonlocal token
        result = store.compare_and_set(b"doctor latency " + secrets.token_hex(4).encode(), token)
        token = None if result.snapshot is None else result.snapshot.token

    reads = _stats(_timed(samples, store.read))
    cases = _stats(_timed(samples, cas))
    lists = _stats(_timed(samples, lambda: store.list_records("hb")))
    details = {"samples": samples, "read": reads, "cas": cases, "list": lists}
    text = ", ".join(
        f"{name} {_ms(stats['median_ms'])} (p90 {_ms(stats['p90_ms'])})"
        for name, stats in (("read", reads), ("CAS", cases), ("list", lists))
    )
    if reads["median_ms"] > SLOW_READ * 1000 or cases["median_ms"] > SLOW_CAS * 1000:
        return Check("latency", "warn", text + ": slow storage makes every join and re-formation slower", details)
    return Check("latency", "pass", text, details)


# -- reach and the whole run ---------------------------------------------------------------------------------------


def check_reach(store: Store) -> Check:
    start = time.perf_counter()
    payload = b"doctor reach " + secrets.token_hex(4).encode()
    result = store.compare_and_set(payload, None)
    snap = store.read()
    store.put_record("hb", "doctor", b'{"n":0}')
    record = store.read_record("hb", "doctor")
    listed = "doctor" in store.list_records("hb")
    store.delete_record("hb", "doctor")
    gone = "doctor" not in store.list_records("hb")
    elapsed = time.perf_counter() - start
    problems = []
    if not result.won or snap is None or snap.data != payload:
        problems.append("a document created in a new run did not read back")
    if record != b'{"n":0}' or not listed or not gone:
        problems.append("a record did not read back, list or delete as written")
    details = {"seconds": round(elapsed, 3), "location": store.location}
    if problems:
        return Check("reach", "fail", "; ".join(problems), details)
    return Check("reach", "pass", f"created, read and deleted a scratch run in {elapsed * 1000:.0f} ms", details)


def run_doctor(
    endpoint: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    secret: bytes | None = None,
    checks: Sequence[str] = CHECKS,
    mountinfo: str | None = None,
    writers: int = 2,
    rounds: int = 5,
    samples: int = 10,
) -> list[Check]:
    """Run the selected checks against ``endpoint`` and return their outcomes (scratch data is removed).

    :raises ConfigurationError: a bad endpoint or option. :raises StorageError: the storage cannot be reached
        at all (the CLI reports it in one line).
    """
    options = dict(storage_options or {})
    scheme, rest = split_endpoint(endpoint)
    if scheme == "memory":
        raise ConfigurationError("memory:// lives inside one process; doctor checks shared storage")
    results: list[Check] = []
    run_id = f"fsrdzv-doctor-{secrets.token_hex(6)}"
    needs_store = any(c in checks for c in ("reach", "cas", "lock", "clock", "latency"))
    mount: Check | None = None
    if "mount" in checks:
        # Read before any I/O: it needs no store, so ``--check mount`` works on a path this host cannot write.
        if scheme == "file":
            mount = check_mount(rest, mountinfo)
        else:
            mount = Check("mount", "skip", f"{scheme}:// is not a mounted file system")
    if not needs_store:
        return [mount] if mount is not None else []
    open_one = _opener(endpoint, options, secret)
    created_root = scheme == "file" and not os.path.isdir(os.path.expanduser(rest))
    store = open_one(run_id)
    try:
        # Reachability first, always: if the storage cannot be reached, the StorageError ends the doctor.
        reach = check_reach(store)
        if "reach" in checks:
            results.append(reach)
        if "cas" in checks:
            results.append(check_cas(open_one, run_id, writers, rounds))
        if "lock" in checks:
            results.append(check_lock(getattr(store, "inner", store)))
        if mount is not None:
            results.append(mount)
        if "clock" in checks:
            directory = getattr(getattr(store, "inner", store), "dir", None)
            if scheme == "file" and isinstance(directory, str):
                os.makedirs(directory, exist_ok=True)
                results.append(check_clock_directory(directory))
            else:
                results.append(check_clock_object(endpoint, options, run_id))
        if "latency" in checks:
            results.append(check_latency(store, samples))
    finally:
        with contextlib.suppress(Exception):
            store.delete_run()
        store.close()
        if created_root:
            # The store created the endpoint's last level for the scratch run; leave the tree as we found it.
            with contextlib.suppress(OSError):
                os.rmdir(os.path.expanduser(rest))
    return results
