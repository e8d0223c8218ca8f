"""Security: nothing read from storage is executed, created files are private by default, state is authenticated
with a job secret (unsigned or tampered data is refused and reported, never acted on), secrets stay out of logs
and errors, and no run id or node id can escape the endpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
import uuid
from pathlib import Path
from typing import Any

import pytest

import fsrdzv
from fsrdzv import _protocol as proto
from fsrdzv._state import JoinRequest, NodeInfo, decode_state, encode_request, encode_request_name, encode_state
from fsrdzv._store import seal
from fsrdzv._stores._memory import memory_space
from fsrdzv.testing import FaultyStore

PACKAGE = Path(fsrdzv.__file__).resolve().parent
REPO = PACKAGE.parent
SECRET = b"fsrdzv-job-secret-" + uuid.uuid4().hex.encode()
OTHER_SECRET = b"someone-elses-secret-" + uuid.uuid4().hex.encode()


def _rid() -> str:
    return "sec-" + uuid.uuid4().hex[:8]


def _fast_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.01))


def _assert_no_secret(text: str) -> None:
    for secret in (SECRET, OTHER_SECRET):
        assert secret.decode() not in text
        assert secret.hex() not in text


# -- nothing read from storage is executed ---------------------------------------------------------------------------

#: Names whose use on stored bytes could run code. Only identifiers count: comments and strings are skipped.
_FORBIDDEN_NAMES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "eval", "exec"}
_FORBIDDEN_CALLS = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("torch", "load")}


def _hits(source: bytes, label: str) -> list[str]:
    """Forbidden identifiers and calls in Python ``source`` (comments and strings, docstrings included, skipped)."""
    hits = []
    previous: list[str] = []
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE):
            continue
        forbidden_name = tok.type == tokenize.NAME and tok.string in _FORBIDDEN_NAMES
        forbidden_call = (
            tok.type == tokenize.NAME and previous[-1:] == ["."] and (previous[0], tok.string) in _FORBIDDEN_CALLS
        )
        if forbidden_name or forbidden_call:
            hits.append(f"{label}:{tok.start[0]}: {tok.line.strip()}")
        previous = [*previous[-1:], tok.string]
    return hits


def test_package_source_has_no_pickle_eval_exec_marshal_or_yaml_load() -> None:
    """Tokenize every module of the package and refuse the identifiers ``pickle``, ``marshal``, ``shelve``,
    ``eval``, ``exec`` (and friends) and the calls ``yaml.load`` / ``torch.load`` outside comments and strings
    (docstrings may say "never pickle"). Prints the number of files scanned."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10
    hits = [hit for path in files for hit in _hits(path.read_bytes(), str(path.relative_to(REPO)))]
    assert not hits, "code-executing deserialisation in the package:\n" + "\n".join(hits)
    print(f"\nscanned {len(files)} files of fsrdzv/: no pickle/eval/exec/marshal/shelve/yaml.load in code")


def test_scanner_finds_what_it_looks_for() -> None:
    """The scanner is not vacuous: it flags each forbidden use in code and ignores comments and strings."""
    sample = (
        b'"""Docstring: never pickle, never eval(."""\n'
        b"import pickle  # pickle\n"
        b'x = "eval(" \n'
        b'y = eval("1")\n'
        b"import yaml\n"
        b"z = yaml.load(s)\n"
        b"w = yaml.safe_load(s)\n"
        b"exec(code)\n"
        b"import marshal\n"
    )
    assert [h.split(":")[1] for h in _hits(sample, "sample")] == ["2", "4", "6", "8", "9"]


class _Boom:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payloads_on_storage_are_never_unpickled(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A pickle that would create a marker file when unpickled is planted as the document (sealed and raw) and as
    join request and heartbeat records. Joining fails closed on the document (StateCorruptError, nothing runs);
    with a valid document the planted records are ignored. The marker never appears. 4 planted payloads."""
    marker = tmp_path / "PWNED"
    bomb = pickle.dumps(_Boom(str(marker)))
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    store = fsrdzv.open_store(endpoint, rid)
    for raw in (seal(bomb, 1), bomb):
        store.delete_run()
        store.compare_and_set(b"{}", None)
        with open(os.path.join(endpoint, rid, "state"), "wb") as f:
            f.write(raw)
        h = fsrdzv.create_handler(endpoint, rid, 1, 1, local_addr="10.0.0.1", join_timeout=10)
        with pytest.raises(fsrdzv.StateCorruptError):
            h.next_rendezvous()
        h._stop_keepalive()
    store.reset(encode_state(proto.new_state(rid, "e")))
    store.put_record("req", "bomb-node", bomb)
    store.put_record("hb", "bomb-node", bomb)
    # Two nodes: the first waits as the folder, listing and reading the request records (and the heartbeats).
    first = fsrdzv.create_handler(endpoint, rid, 2, 2, local_addr="10.0.0.2", join_timeout=10, keep_alive_interval=0.2)
    second = fsrdzv.create_handler(endpoint, rid, 2, 2, local_addr="10.0.0.3", join_timeout=10, keep_alive_interval=0.2)
    got: list[Any] = []
    waiting = threading.Thread(target=lambda: got.append(first.next_rendezvous()))
    waiting.start()
    time.sleep(1.0)
    assert second.next_rendezvous().world_size == 2
    waiting.join(10)
    assert got and got[0].world_size == 2
    first.shutdown()
    second.shutdown()
    assert not marker.exists(), "a payload read from storage was unpickled"
    assert any("bomb-node" in r.getMessage() for r in caplog.records)


# -- permissions -----------------------------------------------------------------------------------------------------


def _modes(root: str) -> dict[str, tuple[str, int]]:
    out = {}
    for path, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.join(path, name)] = ("dir", os.stat(os.path.join(path, name)).st_mode & 0o7777)
        for name in files:
            out[os.path.join(path, name)] = ("file", os.stat(os.path.join(path, name)).st_mode & 0o7777)
    out[root] = ("dir", os.stat(root).st_mode & 0o7777)
    return out


def _form_and_leave_records(endpoint: str, rid: str, options: dict[str, Any]) -> None:
    h = fsrdzv.create_handler(endpoint, rid, 1, 1, local_addr="10.0.0.1", storage_options=options)
    assert h.next_rendezvous().world_size == 1
    h._stop_keepalive()  # keep its records on disk: they are checked too


@pytest.mark.parametrize(
    ("permissions", "umask"),
    [
        ("owner", 0o000),
        ("owner", 0o022),
        ("owner", 0o077),
        ("group", 0o000),
        pytest.param("group", 0o022),
        pytest.param("group", 0o077),
    ],
    ids=["owner-umask000", "owner-umask022", "owner-umask077", "group-umask000", "group-umask022", "group-umask077"],
)
def test_created_files_and_directories_have_the_configured_modes(tmp_path: Any, permissions: str, umask: int) -> None:
    """After a round forms, every directory fsrdzv created (the endpoint's last level, the run, log, records and
    record kinds) has mode 0700 and every file (state, log entries, lock, heartbeat and join records) 0600 by
    default; with permissions='group' 0770 and 0660, whatever the process umask."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    options = {} if permissions == "owner" else {"permissions": permissions}
    old = os.umask(umask)
    try:
        _form_and_leave_records(endpoint, rid, options)
    finally:
        os.umask(old)
    want = {"owner": {"dir": 0o700, "file": 0o600}, "group": {"dir": 0o770, "file": 0o660}}[permissions]
    modes = _modes(endpoint)
    kinds = {kind for kind, _ in modes.values()}
    assert kinds == {"dir", "file"} and len(modes) >= 10, modes
    wrong = {p: oct(m) for p, (kind, m) in modes.items() if m != want[kind]}
    assert not wrong, f"expected {oct(want['dir'])}/{oct(want['file'])}: {wrong}"


_SHARED_GID = 54320
_AS_GROUP_MEMBER = r"""
import json, os, sys, time
import fsrdzv
from fsrdzv import _protocol as proto
from fsrdzv._state import encode_state
os.umask(int(sys.argv[4], 8))
endpoint, rid, role = sys.argv[1], sys.argv[2], sys.argv[3]
options = {"permissions": "group"}
try:
    if role == "create":
        store = fsrdzv.open_store(endpoint, rid, storage_options=options)
        store.compare_and_set(encode_state(proto.new_state(rid, "e")), None)
        store.put_record("hb", "creator", b"1")
        print(json.dumps({"ok": True}))
    else:
        h = fsrdzv.create_handler(endpoint, rid, 1, 1, storage_options=options, join_timeout=20,
                                  sleep=lambda s: time.sleep(min(s, 0.01)))
        info = h.next_rendezvous()
        print(json.dumps({"ok": True, "rank": info.rank}))
except fsrdzv.RendezvousError as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
"""


def _as_user(uid: int, args: list[str]) -> dict[str, Any]:
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={_SHARED_GID}", "--clear-groups", sys.executable, "-c"]
    done = subprocess.run(
        [*cmd, _AS_GROUP_MEMBER, *args], capture_output=True, text=True, timeout=60, cwd=str(REPO), check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize(
    "umask",
    [0o002, 0o022],
    ids=["umask002", "umask022"],
)
def test_group_shared_run_is_writable_by_another_member_of_the_group(umask: int) -> None:
    """Two non-root users sharing only a group (setpriv: real uids 54321 and 54322, gid 54320). The first creates the
    run with permissions='group'; the second must be able to join it. Passes with umask 002, must also pass with
    the common umask 022 (the setting promises 0770/0660)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run processes as other users")
    base = tempfile.mkdtemp(prefix="fsrdzv-group-")
    try:
        os.chown(base, 0, _SHARED_GID)
        os.chmod(base, 0o770)
        endpoint, rid = os.path.join(base, "rdzv"), _rid()
        assert _as_user(54321, [endpoint, rid, "create", oct(umask)]) == {"ok": True}
        joined = _as_user(54322, [endpoint, rid, "join", oct(umask)])
        assert joined == {"ok": True, "rank": 0}, joined
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- authentication with a job secret --------------------------------------------------------------------------------


def _envelope(raw: bytes) -> tuple[dict[bytes, bytes], bytes]:
    head, _, payload = raw.partition(b"\n")
    fields = dict(f.partition(b"=")[::2] for f in head.split(b" ")[1:])
    return fields, payload


def _verify(raw: bytes, secret: bytes) -> bool:
    fields, payload = _envelope(raw)
    if b"hmac" not in fields:
        return False
    want = hmac.new(secret, b"%d\n" % int(fields[b"gen"]), hashlib.sha256)
    want.update(payload)
    return hmac.compare_digest(fields[b"hmac"], want.hexdigest().encode())


def _form(endpoint: str, rid: str, count: int, **kwargs: Any) -> list[fsrdzv.RendezvousHandler]:
    handlers = [
        fsrdzv.create_handler(endpoint, rid, count, count, local_addr=f"10.0.4.{i + 1}", **kwargs) for i in range(count)
    ]
    infos: list[Any] = []

    def run(h: fsrdzv.RendezvousHandler) -> None:
        try:
            infos.append(h.next_rendezvous())
        except BaseException as exc:
            infos.append(exc)

    threads = [threading.Thread(target=run, args=(h,)) for h in handlers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(i.rank for i in infos) == list(range(count)), infos
    return handlers


def test_every_document_and_record_carries_a_valid_hmac(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With FSRDZV_SECRET_FILE set, two nodes form a round; every object on disk (state, every log entry,
    heartbeat and join request records, the announcement of the completed round) carries an HMAC-SHA256 that
    verifies with the job secret, and none verifies with another secret. The secret appears in no log line.
    Prints the number of objects checked."""
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    monkeypatch.setenv("FSRDZV_SECRET_FILE", str(secret_file))
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    handlers = _form(endpoint, rid, 2)
    for h in handlers:
        h._stop_keepalive()
    objects = []
    for path, _, files in os.walk(os.path.join(endpoint, rid)):
        for name in files:
            if name == "lock":
                continue
            with open(os.path.join(path, name), "rb") as f:
                objects.append((os.path.join(path, name), f.read()))
    kinds = {os.path.relpath(p, os.path.join(endpoint, rid)).split(os.sep)[0] for p, _ in objects}
    assert kinds == {"state", "log", "records"}
    records = sorted(
        os.path.relpath(p, os.path.join(endpoint, rid, "records")).split(os.sep)[0]
        for p, _ in objects
        if "records" in p
    )
    assert records == ["done", "hb", "hb", "req", "req"]  # hb and req of each node, the round's announcement
    for path, raw in objects:
        assert raw.startswith(b"fsrdzv1 "), path
        assert _verify(raw, SECRET), f"{path} is not signed with the job secret"
        assert not _verify(raw, OTHER_SECRET)
    _assert_no_secret(caplog.text)
    print(f"\n{len(objects)} objects on disk, each with a valid HMAC-SHA256")


def test_forged_and_tampered_join_requests_are_ignored_and_reported(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Three join requests planted by someone without the secret: unsigned, signed with another secret, and a
    correctly signed request whose payload was altered (checksum recomputed), plus two requests carried in record
    names (unsigned, and signed with another secret). Folding nodes refuse each with a warning naming it; two real
    nodes (min 2, max 5) form a round of exactly two; no planted node ever appears in any committed document
    version; the secret never appears in the log. 5 forgeries."""
    caplog.set_level(logging.DEBUG)
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    forger = fsrdzv.open_store(endpoint, rid)  # no secret
    evil = [NodeInfo(f"6.6.6.{i}", 666, i, f"ev{i}", 1, "evil") for i in range(5)]
    inline = []
    for node, store_ in ((evil[3], forger), (evil[4], fsrdzv.open_store(endpoint, rid, secret=OTHER_SECRET))):
        name_ = encode_request_name(JoinRequest(node, "1.ff"), store_.name_mac)
        assert name_ is not None
        store_.put_record("req", name_, encode_request(JoinRequest(node, "1.ff")))
        inline.append(name_)
    forger.put_record("req", evil[0].node_id, encode_request(JoinRequest(evil[0], "n0")))
    other = fsrdzv.open_store(endpoint, rid, secret=OTHER_SECRET)
    other.put_record("req", evil[1].node_id, encode_request(JoinRequest(evil[1], "n1")))
    genuine = seal(encode_request(JoinRequest(evil[2], "n2")), 0, SECRET)
    fields, payload = _envelope(genuine)
    altered = payload.replace(b'"n2"', b'"n3"')
    tampered = b"fsrdzv1 gen=0 sha256=%s hmac=%s\n%s" % (
        hashlib.sha256(altered).hexdigest().encode(),
        fields[b"hmac"],
        altered,
    )
    directory = os.path.join(endpoint, rid, "records", "req")
    from fsrdzv._store import encode_name

    with open(os.path.join(directory, encode_name(evil[2].node_id)), "wb") as f:
        f.write(tampered)
    handlers = _form(endpoint, rid, 2, secret=SECRET, last_call_timeout=0.5)
    for h in handlers:
        h._stop_keepalive()
    store = fsrdzv.open_store(endpoint, rid, secret=SECRET)
    snap = store.read()
    assert snap is not None
    final = decode_state(snap.data, "final")
    assert len(final.participants) == 2
    evil_ids = {n.node_id for n in evil}
    log_dir = os.path.join(endpoint, rid, "log")
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name), "rb") as f:
            assert not any(e.encode() in f.read() for e in evil_ids), f"a forged node reached log entry {name}"
    refused = [r.getMessage() for r in caplog.records if "not signed with this job's secret" in r.getMessage()]
    for node in evil[:3]:
        assert any(node.node_id in m for m in refused), (node.node_id, refused)
    for name_ in inline:
        assert any(name_[:40] in m for m in refused), (name_, refused)
    assert all("\n" not in m for m in refused)
    _assert_no_secret(caplog.text)


def _signed_doc(store: fsrdzv.Store, rid: str) -> fsrdzv.Snapshot:
    snap = store.compare_and_set(encode_state(proto.new_state(rid, "e")), None).snapshot
    assert snap is not None
    return snap


@pytest.mark.parametrize("forgery", ["unsigned", "other-secret", "tampered-payload"])
def test_forged_document_stops_the_node_with_a_clear_error(
    tmp_path: Any, forgery: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The document is replaced by one written without the job secret, signed with another one, or altered after
    signing (checksum recomputed, HMAC kept). Joining stops with a one-line TamperedError that names the run and
    endpoint and says what to check; the forged bytes are left as they are (nothing acted on or overwritten);
    neither the log nor the error contains the secret. 3 forgeries."""
    caplog.set_level(logging.DEBUG)
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    store = fsrdzv.open_store(endpoint, rid, secret=SECRET)
    snap = _signed_doc(store, rid)
    doc = json.loads(snap.data)
    doc["participants"] = {}
    forged_payload = json.dumps({**doc, "closed": True}).encode()
    if forgery == "unsigned":
        raw = seal(forged_payload, snap.generation)
    elif forgery == "other-secret":
        raw = seal(forged_payload, snap.generation, OTHER_SECRET)
    else:
        fields, _ = _envelope(seal(snap.data, snap.generation, SECRET))
        raw = b"fsrdzv1 gen=%d sha256=%s hmac=%s\n%s" % (
            snap.generation,
            hashlib.sha256(forged_payload).hexdigest().encode(),
            fields[b"hmac"],
            forged_payload,
        )
    state_path = os.path.join(endpoint, rid, "state")
    with open(state_path, "wb") as f:
        f.write(raw)
    h = fsrdzv.create_handler(endpoint, rid, 1, 1, local_addr="10.0.0.1", secret=SECRET, join_timeout=10)
    with pytest.raises(fsrdzv.TamperedError) as info:
        h.next_rendezvous()
    text = str(info.value)
    assert "\n" not in text
    assert f"run {rid!r} at {endpoint}" in text
    assert "not signed with this job's secret" in text and "same secret_file" in text
    assert h.shutdown() is False  # it refuses to close a document it cannot trust
    with open(state_path, "rb") as f:
        assert f.read() == raw
    _assert_no_secret(caplog.text + text + repr(info.value))


def test_replayed_old_signed_document_does_not_roll_the_run_back(tmp_path: Any) -> None:
    """Someone with write access copies an old, correctly signed log entry over ``state`` (a replay). The directory
    store rolls forward through the commit log, so readers still see the newest generation."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    store = fsrdzv.open_store(endpoint, rid, secret=SECRET)
    snap = _signed_doc(store, rid)
    for i in range(5):
        got = store.compare_and_set(b'{"i": %d}' % i, snap.token).snapshot
        assert got is not None
        snap = got
    with open(os.path.join(endpoint, rid, "log", f"{2:020d}"), "rb") as f:
        old = f.read()
    with open(os.path.join(endpoint, rid, "state"), "wb") as f:
        f.write(old)
    now = store.read()
    assert now is not None and now.generation == snap.generation and now.data == snap.data


def test_forged_heartbeats_do_not_keep_a_dead_node_alive() -> None:
    """With a job secret: A and B form a round, C waits as a spare. B dies (its keep-alive stops) while a forger
    without the secret keeps rewriting B's heartbeat record. C must ignore the unsigned beats and remove B within
    a few keep-alive timeouts."""
    rid = _rid()
    name = f"hbforge-{uuid.uuid4().hex[:8]}"
    endpoint = f"memory://{name}"
    settings: dict[str, Any] = {"keep_alive_interval": 0.2, "keep_alive_max_attempt": 3, "last_call_timeout": 0.3}
    a, b = _form(endpoint, rid, 2, secret=SECRET, **settings)
    c = fsrdzv.create_handler(endpoint, rid, 2, 2, local_addr="10.0.4.9", secret=SECRET, **settings)
    outcome: list[Any] = []
    spare = threading.Thread(target=lambda: outcome.append(_catch(c.next_rendezvous)))
    spare.start()
    forger = fsrdzv.open_store(endpoint, rid)
    stop = threading.Event()

    def forge() -> None:
        n = 0
        while not stop.wait(0.1):
            n += 1
            forger.put_record("hb", b.node_id, b'{"n":%d}' % (10_000 + n))

    forging = threading.Thread(target=forge)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            snap = forger.read()
            if snap is not None and c.node_id in decode_state(snap.data.split(b"\n", 1)[-1], "doc").redundancy_list:
                break
            time.sleep(0.05)
        b._stop_keepalive()
        forging.start()
        removed = False
        deadline = time.monotonic() + 4 * 0.6 + 2
        while time.monotonic() < deadline and not removed:
            snap = forger.read()
            assert snap is not None
            removed = b.node_id not in decode_state(snap.data.split(b"\n", 1)[-1], "doc").participants
            time.sleep(0.05)
        assert removed, "a dead node was kept alive by unsigned heartbeats"
    finally:
        stop.set()
        if forging.is_alive():
            forging.join(5)
        a.set_closed()
        spare.join(20)
        for h in (a, b, c):
            h._stop_keepalive()


@pytest.mark.parametrize("watcher", ["ring watch", "sweep"])
def test_a_replayed_heartbeat_is_no_sign_of_life(watcher: str, tmp_path: Any) -> None:
    """With a job secret, on a directory, both observers of heartbeats (the ring watch's ``RunAdmin.heartbeat_tags``
    and the sweeps' ``BeatFilter``): a new beat changes the tag; the node's own older record written back (validly
    signed: an attacker with write access but no secret replaying it) does not, nor does a forged one."""
    from fsrdzv._admin import RunAdmin
    from fsrdzv._records import BeatFilter
    from fsrdzv._session import Session

    endpoint = str(tmp_path / "rdzv")
    writer = fsrdzv.open_store(endpoint, "run", secret=SECRET)
    observer = fsrdzv.open_store(endpoint, "run", secret=SECRET)
    admin, beats = RunAdmin(observer), BeatFilter(Session(observer))

    def tag() -> str | None:
        return (admin.heartbeat_tags(["peer"]) if watcher == "ring watch" else beats.tags()).get("peer")

    path = os.path.join(endpoint, "run", "records", "hb", "peer")
    writer.put_record("hb", "peer", b'{"n":1}')
    first = Path(path).read_bytes()
    one = tag()
    writer.put_record("hb", "peer", b'{"n":2}')
    two = tag()
    assert one is not None and two is not None and two != one
    Path(path + ".replay").write_bytes(first)
    os.replace(path + ".replay", path)
    assert tag() == two  # replayed: no change
    fsrdzv.open_store(endpoint, "run").put_record("hb", "peer", b'{"n":99}')  # forged: unsigned
    assert tag() == two
    writer.put_record("hb", "peer", b'{"n":3}')
    assert tag() not in (one, two, None)


def _catch(fn: Any) -> Any:
    try:
        return fn()
    except fsrdzv.RendezvousError as exc:
        return exc


def test_secret_file_errors_do_not_leak_the_secret(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short secret and a missing secret file are refused with a ConfigurationError naming the file only."""
    short = tmp_path / "short"
    short.write_bytes(b"tiny-secret")
    monkeypatch.setenv("FSRDZV_SECRET_FILE", str(short))
    with pytest.raises(fsrdzv.ConfigurationError) as info:
        fsrdzv.create_handler(str(tmp_path / "rdzv"), "run", 1, 1)
    assert str(short) in str(info.value) and "shorter than 16 bytes" in str(info.value)
    assert "tiny-secret" not in str(info.value)
    monkeypatch.setenv("FSRDZV_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(fsrdzv.ConfigurationError) as info:
        fsrdzv.create_handler(str(tmp_path / "rdzv"), "run", 1, 1)
    assert "cannot read the secret file" in str(info.value)


# -- path traversal --------------------------------------------------------------------------------------------------

_NASTY = [
    "../../../../escape",
    "/etc/passwd",
    "..",
    ".",
    "a/../../b",
    "..\\..\\win",
    "%2e%2e%2fescape",
    "nul\x00byte",
    "new\nline",
    "~root",
    "ü/../ö",
    "." * 40,
]


def _all_paths(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_node_ids_cannot_escape_the_directory_endpoint(tmp_path: Any) -> None:
    """Record names (node ids) full of separators, dots, escapes and control characters are written, read back,
    listed under their exact names and deleted, and every file stays inside ``<run>/records/<kind>/`` with a name
    that has no separator and does not start with a dot. 12 names, plus a real handler whose address is one."""
    endpoint = tmp_path / "ep" / "rdzv"
    (tmp_path / "ep").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    before = _all_paths(tmp_path) - _all_paths(tmp_path / "ep")
    rid = _rid()
    store = fsrdzv.open_store(str(endpoint), rid)
    for i, name in enumerate(_NASTY):
        store.put_record("hb", name, b"%d" % i)
    for i, name in enumerate(_NASTY):
        assert store.read_record("hb", name) == b"%d" % i
    assert set(store.list_records("hb")) == set(_NASTY)
    records = endpoint / rid / "records" / "hb"
    for path in _all_paths(tmp_path / "ep"):
        assert path == str(endpoint) or path.startswith(str(endpoint / rid)), f"{path} escaped the run"
    for entry in os.listdir(records):
        assert "/" not in entry and "\\" not in entry and not entry.startswith("."), entry
    h = fsrdzv.create_handler(str(endpoint), rid, 1, 1, local_addr="../../../outside/pwn")
    assert h.next_rendezvous().world_size == 1
    h._stop_keepalive()
    assert _all_paths(tmp_path) - _all_paths(tmp_path / "ep") == before, "something was written outside"
    assert not list(outside.iterdir())
    for name in _NASTY:
        store.delete_record("hb", name)
    assert set(store.list_records("hb")) == {h.node_id}


def test_node_ids_cannot_reach_another_run_in_the_memory_store() -> None:
    """In memory://, the same names stay inside their run: no other run appears in the space and a sibling run
    with a prefix-sharing id sees none of them."""
    name = f"trav-{uuid.uuid4().hex[:8]}"
    rid = _rid()
    store = fsrdzv.open_store(f"memory://{name}", rid)
    sibling = fsrdzv.open_store(f"memory://{name}", rid + "-x")
    for name_ in _NASTY:
        store.put_record("req", name_, b"1")
    assert set(store.list_records("req")) == set(_NASTY)
    assert sibling.list_records("req") == {}
    space = memory_space(name)
    assert set(space.runs) == {rid}
    for key in space.runs[rid].records["req"]:
        assert "/" not in key and not key.startswith(".")


@pytest.mark.parametrize("endpoint_kind", ["directory", "memory"])
def test_a_faulty_store_around_a_signed_store_keeps_the_signature(tmp_path: Any, endpoint_kind: str) -> None:
    """Wrappers delegate at the public layer: what a FaultyStore writes, the signed store it wraps reads back."""
    endpoint = str(tmp_path / "rdzv") if endpoint_kind == "directory" else f"memory://faulty-signed-{uuid.uuid4().hex}"
    signed = fsrdzv.open_store(endpoint, "signed", secret=b"job secret")
    faulty = FaultyStore(signed)
    assert faulty.signed
    first = faulty.compare_and_set(b"through the wrapper", None)
    assert first.won and first.snapshot is not None
    second = faulty.compare_and_set(b"again", first.snapshot.token)
    assert second.won
    faulty.put_record("hb", "node", b"beat")
    snap = signed.read()  # no TamperedError: the wrapper's writes carry the HMAC
    assert snap is not None and snap.data == b"again" and snap == second.snapshot
    assert signed.read_record("hb", "node") == b"beat"
    assert faulty.name_mac("x") == signed.name_mac("x") is not None
