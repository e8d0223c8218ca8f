"""Bad input, through the Python API (``fsrdzv.create_handler(...).next_rendezvous()`` and ``fsrdzv.open_store``):
each case must give a one-line, specific error that names the object and says what to do, and must overwrite
nothing (the document's bytes on disk are compared before and after). Replacing an unreadable document happens
only through ``Store.reset`` (``fsrdzv reset --force``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import fsrdzv
from fsrdzv import _protocol as proto
from fsrdzv._state import JoinRequest, NodeInfo, encode_request, encode_state
from fsrdzv._store import MAX_DOCUMENT_BYTES, seal
from fsrdzv.testing import FaultyStore

# -- helpers ---------------------------------------------------------------------------------------------------------


def _rid() -> str:
    return "bad-" + uuid.uuid4().hex[:8]


def _valid_doc(rid: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(encode_state(proto.new_state(rid, "0123456789abcdef")))
    return doc


def _document_bytes(run_dir: str) -> dict[str, bytes]:
    out = {}
    for rel in ["state", *(os.path.join("log", n) for n in os.listdir(os.path.join(run_dir, "log")))]:
        with open(os.path.join(run_dir, rel), "rb") as f:
            out[rel] = f.read()
    return out


def _error_text(exc: BaseException) -> str:
    """Every message of the exception chain (str and repr), where a secret or a traceback must never appear."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def _check_message(exc: BaseException, *fragments: str) -> str:
    text = str(exc)
    assert "\n" not in text, f"not one line: {text!r}"
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


def _fast_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.01))


# -- unreadable documents --------------------------------------------------------------------------------------------

_HINT = "'fsrdzv reset --force'"


def _sealed(doc: dict[str, Any]) -> Callable[[int], bytes]:
    return lambda gen: seal(json.dumps(doc).encode(), gen)


def _cases(rid: str) -> dict[str, tuple[Callable[[int], bytes], type[Exception], list[str]]]:
    base = _valid_doc(rid)
    full = seal(json.dumps({**base, "epoch": "x" * 2000}).encode(), 1)

    def edited(**changes: Any) -> Callable[[int], bytes]:
        doc = dict(base)
        for key, value in changes.items():
            if value is ...:
                del doc[key]
            else:
                doc[key] = value
        return _sealed(doc)

    node = {"addr": "10.0.0.1", "pid": 1, "local_id": 0, "nonce": "aa", "port": 1, "host": "h"}
    corrupt = fsrdzv.StateCorruptError
    return {
        "corrupt-json": (
            lambda g: seal(b'{"schema": 1, "kind": "fsrdzv.rendezvous", "round": ,}', g),
            corrupt,
            ["is not valid JSON", _HINT],
        ),
        "truncated-file": (
            lambda g: full[: len(full) // 2],
            corrupt,
            ["truncated or altered (checksum mismatch)", _HINT],
        ),
        "empty-file": (lambda g: b"", corrupt, ["is empty", _HINT]),
        "foreign-json-file": (
            lambda g: b'{"apiVersion": "v1", "kind": "ConfigMap"}\n',
            corrupt,
            ["is not an fsrdzv document (no 'fsrdzv1' header)", _HINT],
        ),
        "foreign-json-in-envelope": (
            _sealed({"apiVersion": "v1", "kind": "ConfigMap"}),
            corrupt,
            ["is not an fsrdzv rendezvous document", _HINT],
        ),
        "malformed-header": (lambda g: b"fsrdzv1 gen=x sha256=zz\n{}", corrupt, ["has a malformed header", _HINT]),
        "newer-schema": (
            edited(schema=3),
            fsrdzv.SchemaVersionError,
            ["uses schema 3, newer than the 2 this fsrdzv understands", "upgrade fsrdzv on this node"],
        ),
        "wrong-type-round": (edited(round="3"), corrupt, ["field 'round' has the wrong type (str)", _HINT]),
        "wrong-type-complete": (edited(complete=1), corrupt, ["field 'complete' has the wrong type (int)", _HINT]),
        "wrong-type-participants": (
            edited(participants=["a"]),
            corrupt,
            ["field 'participants' has the wrong type (list)", _HINT],
        ),
        "wrong-type-rank": (
            edited(participants={"n": "0"}, nodes={"n": node}),
            corrupt,
            ["'participants' must map node ids to integer ranks", _HINT],
        ),
        "wrong-type-node": (
            edited(participants={"n": 0}, nodes={"n": {**node, "pid": "1"}}),
            corrupt,
            ["a node entry has fields of the wrong type", _HINT],
        ),
        "missing-field": (edited(nodes=...), corrupt, ["field 'nodes' is missing", _HINT]),
        "node-in-two-lists": (
            edited(participants={"n": 0}, wait_list=["n"], nodes={"n": node}),
            corrupt,
            ["a node is listed twice", _HINT],
        ),
        "oversized-document": (
            lambda g: seal(b" " * (MAX_DOCUMENT_BYTES + 4096), g),
            corrupt,
            [f"over the {MAX_DOCUMENT_BYTES}-byte limit", _HINT],
        ),
    }


_ENVELOPE_LEVEL = {
    "truncated-file",
    "empty-file",
    "foreign-json-file",
    "malformed-header",
    "oversized-document",
}
_CASE_IDS = list(_cases("x"))


@pytest.mark.parametrize("case", _CASE_IDS)
def test_unreadable_document_fails_closed_with_one_line_error(
    tmp_path: Any, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The run's ``state`` file is replaced by bad bytes (as a buggy or foreign writer or a damaged disk would).
    Joining raises a one-line error of the right class naming the run id and path and saying what to do; the
    document's bytes are unchanged after the join, after a create-if-absent CAS and after shutdown; only
    ``Store.reset`` (``fsrdzv reset --force``) replaces it, after which a round forms. 15 cases."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    make, error, fragments = _cases(rid)[case]
    store = fsrdzv.open_store(endpoint, rid)
    first = store.compare_and_set(encode_state(proto.new_state(rid, "e")), None).snapshot
    assert first is not None
    run_dir = os.path.join(endpoint, rid)
    with open(os.path.join(run_dir, "state"), "wb") as f:
        f.write(make(first.generation))
    before = _document_bytes(run_dir)

    h = fsrdzv.create_handler(endpoint, rid, 1, 1, local_addr="10.0.0.1", join_timeout=20)
    with pytest.raises(error) as info:
        h.next_rendezvous()
    text = _check_message(info.value, f"run {rid!r} at {endpoint}", *fragments)
    assert _document_bytes(run_dir) == before
    if case in _ENVELOPE_LEVEL:
        with pytest.raises(error):
            store.read()
        with pytest.raises(error):
            store.compare_and_set(b"{}", None)
    else:
        assert not store.compare_and_set(b"{}", None).won
    assert h.shutdown() is False  # it cannot close an unreadable run, and says so in the log
    assert _document_bytes(run_dir) == before
    assert any("could not close" in r.getMessage() for r in caplog.records)

    store.reset(encode_state(proto.new_state(rid, "fresh")))
    again = fsrdzv.create_handler(endpoint, rid, 1, 1, local_addr="10.0.0.2", join_timeout=20)
    info2 = again.next_rendezvous()
    assert (info2.rank, info2.world_size) == (0, 1)
    again.shutdown()
    print(f"\n{case}: {text[:160]}...")


def test_corrupt_join_request_record_is_ignored_and_reported(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A join request record that is garbage (valid envelope, invalid request) or not an envelope is skipped with
    one warning naming it, and the round of the real nodes forms without it. 2 bad records."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    junk = fsrdzv.open_store(endpoint, rid)
    junk.put_record("req", "garbage-node", b'{"node": 42}')
    os.makedirs(os.path.join(endpoint, rid, "records", "req"), exist_ok=True)
    with open(os.path.join(endpoint, rid, "records", "req", "raw-node"), "wb") as f:
        f.write(b"\x00\x01 not an envelope")
    h = fsrdzv.create_handler(endpoint, rid, 1, 2, local_addr="10.0.0.1", last_call_timeout=0.2)
    info = h.next_rendezvous()
    assert info.world_size == 1
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring")]
    assert any("join request 'garbage-node'" in w for w in warnings), warnings
    assert any("raw-node" in w and "not an fsrdzv document" in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings)
    h.shutdown()


@pytest.mark.parametrize("name", ["stray%zz", "stray%C3", "stray%"])
def test_stray_file_with_unescaped_name_in_records_is_ignored(
    tmp_path: Any, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stray file whose name is not a valid escaped node id (an editor backup, a copied file) sits in
    ``records/req/``: joining works, and listing the records (what the folding node does) ignores it with a
    warning naming it instead of dying with a raw UnicodeDecodeError (found by this test; fixed in
    ``Store.list_records``). 3 names."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    directory = os.path.join(endpoint, rid, "records", "req")
    os.makedirs(directory)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(b"junk")
    h = fsrdzv.create_handler(endpoint, rid, 1, 1, local_addr="10.0.0.1", join_timeout=10)
    try:
        assert h.next_rendezvous().world_size == 1
    finally:
        h._stop_keepalive()
    assert os.path.exists(os.path.join(directory, name))
    listed = fsrdzv.open_store(endpoint, rid).list_records("req")
    assert len(listed) == 1 + (name == "stray%")  # the node's own request (and a literally decoded name)
    if name != "stray%":  # a lone '%' at the end is decoded literally
        assert any(name in r.getMessage() for r in caplog.records if r.levelname == "WARNING"), caplog.text


_OVERSIZED_CHILD = r"""
import resource, sys
import fsrdzv
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
try:
    fsrdzv.open_store(sys.argv[1], sys.argv[2]).read()
    print("read")
except fsrdzv.StateCorruptError as exc:
    print("StateCorruptError", exc)
except MemoryError:
    print("MemoryError")
"""


def test_size_limit_is_enforced_before_reading_a_huge_file(tmp_path: Any) -> None:
    """A sparse 4 GiB ``state`` file, read by a process limited to 1 GiB of address space: the size limit must be
    applied while reading (read at most limit + header + 1 bytes), not after."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    fsrdzv.open_store(endpoint, rid).compare_and_set(b"{}", None)
    with open(os.path.join(endpoint, rid, "state"), "r+b") as f:
        f.truncate(4 << 30)
    done = subprocess.run(
        [sys.executable, "-c", _OVERSIZED_CHILD, endpoint, rid], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.startswith("StateCorruptError"), (done.stdout, done.stderr[-500:])
    assert "over the" in done.stdout


# -- endpoints -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", ["ftp://host/rdzv", "hdfs://namenode/rdzv", "http://example.com/rdzv", "sftp://h/x"]
)
def test_unknown_endpoint_scheme(endpoint: str) -> None:
    """Schemes without compare-and-set are refused with UnsupportedStoreError naming the endpoint and the
    supported schemes, by open_store and create_handler alike. 4 schemes."""
    for call in (
        lambda: fsrdzv.open_store(endpoint, "run"),
        lambda: fsrdzv.create_handler(endpoint, "run", 1, 1),
    ):
        with pytest.raises(fsrdzv.UnsupportedStoreError) as info:
            call()
        _check_message(info.value, repr(endpoint), "is not supported", "s3://", "gs://", "memory://")


@pytest.mark.parametrize(
    ("endpoint", "fragment"),
    [
        ("", "invalid endpoint ''"),
        ("   ", "invalid endpoint '   '"),
        (None, "invalid endpoint None"),
        ("file://otherhost/shared", "names a host; use file:///absolute/path"),
        ("s3://", "names no bucket or container"),
    ],
)
def test_malformed_endpoint(endpoint: Any, fragment: str) -> None:
    with pytest.raises(fsrdzv.ConfigurationError) as info:
        fsrdzv.open_store(endpoint, "run")
    _check_message(info.value, fragment)


def test_endpoint_without_conditional_writes_is_refused_by_the_handler() -> None:
    """A store whose compare-and-set ignores its precondition (FaultyStore ignore_conditions: a lying store). The
    handler must refuse it with UnsupportedStoreError naming the endpoint before it hands out any rank."""
    rid = _rid()
    name = f"liar-{uuid.uuid4().hex[:8]}"
    inner = fsrdzv.open_store(f"memory://{name}", rid)
    liar = FaultyStore(inner, ignore_conditions=True)
    stale = liar.compare_and_set(b"1", None).snapshot
    assert stale is not None
    assert liar.compare_and_set(b"2", stale.token).won
    assert liar.compare_and_set(b"3", stale.token).won  # a stale token wins: the store lies
    inner.delete_run()
    settings = fsrdzv.Settings(run_id=rid, min_nodes=1, max_nodes=1, join_timeout=10)
    h = fsrdzv.RendezvousHandler(liar, settings, local_addr="10.0.0.1")
    try:
        with pytest.raises(fsrdzv.UnsupportedStoreError) as info:
            h.next_rendezvous()
        _check_message(info.value, f"memory://{name}", "conditional writes")
    finally:
        h._stop_keepalive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_KEY_SECRET = "wJalrXUtnFEMI-not-a-real-secret-9f3e2a"


def test_unreachable_object_store_endpoint() -> None:
    """s3:// whose endpoint_url is a closed local port: create_handler fails (the conditional-write self-test runs
    at open) with a one-line StorageError that names the bucket, the endpoint URL and what to check, without the
    secret key anywhere in the error chain. Prints how long the user waits."""
    pytest.importorskip("s3fs")
    url = f"http://127.0.0.1:{_free_port()}"
    options = {"endpoint_url": url, "key": "AKIAFSRDZVTEST000000", "secret": _KEY_SECRET}
    started = time.monotonic()
    with pytest.raises(fsrdzv.StorageError) as info:
        fsrdzv.create_handler("s3://bucket/prefix", _rid(), 1, 1, storage_options=options)
    waited = time.monotonic() - started
    text = _check_message(info.value, "s3://bucket/prefix", url, "cannot connect", "check endpoint_url")
    assert _KEY_SECRET not in _error_text(info.value)
    assert _KEY_SECRET not in "".join(traceback.format_exception_only(type(info.value), info.value))
    print(f"\nunreachable endpoint reported after {waited:.1f}s: {text}")


@pytest.fixture(scope="module")
def moto_with_auth() -> Iterator[tuple[str, str, str]]:
    """A moto S3 server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=4: the first four requests create a
    bucket, an IAM user, its policy and its access key; every later request must be signed by a known key).
    Plain moto accepts any credentials, which is why this test starts its own server."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(server):
        pytest.skip("moto_server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/data.json", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("moto_server did not start")
                time.sleep(0.2)
        kw = {"endpoint_url": url, "aws_access_key_id": "x", "aws_secret_access_key": "y", "region_name": "us-east-1"}
        boto3.client("s3", **kw).create_bucket(Bucket="fsrdzv-auth")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="rdzv")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="rdzv", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="rdzv")["AccessKey"]
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("which", ["unknown-key", "wrong-secret"])
def test_bad_credentials(moto_with_auth: tuple[str, str, str], which: str) -> None:
    """Against a moto server that enforces signatures: an unknown access key and a wrong secret key each fail at
    create_handler with a one-line StorageError (EACCES) saying which credential to check, and the secret never
    shows in the error chain. The right key works (control). 2 bad credentials."""
    url, key_id, secret = moto_with_auth
    key, wrong = ("AKIAUNKNOWNKEY000000", _KEY_SECRET) if which == "unknown-key" else (key_id, _KEY_SECRET)
    options = {"endpoint_url": url, "key": key, "secret": wrong, "client_kwargs": {"region_name": "us-east-1"}}
    endpoint = f"s3://fsrdzv-auth/{which}"
    with pytest.raises(fsrdzv.StorageError) as info:
        # The self-test at open fails first; were it cached for this endpoint, the first join operation would.
        fsrdzv.create_handler(endpoint, _rid(), 1, 1, storage_options=options, sleep=_fast_sleep).next_rendezvous()
    hint = "check AWS_ACCESS_KEY_ID / 'key'" if which == "unknown-key" else "check AWS_SECRET_ACCESS_KEY / 'secret'"
    text = _check_message(info.value, endpoint, hint)
    assert info.value.errno == 13
    assert _KEY_SECRET not in _error_text(info.value) and secret not in _error_text(info.value)
    good = {"endpoint_url": url, "key": key_id, "secret": secret, "client_kwargs": {"region_name": "us-east-1"}}
    h = fsrdzv.create_handler(endpoint, _rid(), 1, 1, storage_options=good)
    assert h.next_rendezvous().world_size == 1
    h.shutdown()
    print(f"\n{which}: {text}")


# -- configuration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"join_timeout": -1}, "join_timeout=-1 must be a positive number of seconds"),
        ({"last_call_timeout": 0}, "last_call_timeout=0 must be a positive number of seconds"),
        ({"close_timeout": -0.5}, "close_timeout=-0.5 must be a positive number of seconds"),
        ({"heartbeat_timeout": float("nan")}, "heartbeat_timeout=nan must be a positive number of seconds"),
        ({"keep_alive_interval": "abc"}, "keep_alive_interval='abc' is not a number of seconds"),
        ({"keep_alive_interval": float("inf")}, "keep_alive_interval=inf must be a positive number of seconds"),
        ({"join_timeout": None}, "join_timeout=None is not a number of seconds"),
        ({"keep_alive_max_attempt": 0}, "keep_alive_max_attempt=0 must be at least 1"),
        ({"keep_alive_max_attempt": 2.5}, "keep_alive_max_attempt=2.5 is not an integer"),
        ({"min_nodes": 3, "max_nodes": 2}, "max_nodes (2) must be greater than or equal to min_nodes (3)"),
        ({"min_nodes": "two"}, "min_nodes='two' is not an integer"),
        ({"min_nodes": 0}, "min_nodes=0 must be at least 1"),
        ({"max_nodes": True}, "max_nodes=True is not an integer"),
    ],
)
def test_invalid_config_values(changes: dict[str, Any], fragment: str) -> None:
    """Invalid settings fail in create_handler, before any storage access, with a ConfigurationError naming the
    key and the value. 13 cases."""
    args: dict[str, Any] = {"min_nodes": 1, "max_nodes": 2, **changes}
    with pytest.raises(fsrdzv.ConfigurationError) as info:
        fsrdzv.create_handler("/nonexistent/never/touched", "run", **args)
    _check_message(info.value, fragment)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"permissions": "everyone"}, "permissions='everyone' is not one of 'owner', 'group', 'world'"),
        ({"locking": False}, "unknown storage option(s) ['locking']"),
    ],
)
def test_invalid_storage_options(tmp_path: Any, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(fsrdzv.ConfigurationError) as info:
        fsrdzv.open_store(str(tmp_path / "rdzv"), "run", storage_options=options)
    _check_message(info.value, fragment)
    with pytest.raises(fsrdzv.ConfigurationError):
        fsrdzv.open_store("memory://x", "run", storage_options=options)


@pytest.mark.parametrize(
    "options",
    [{"lock_timeout": -1}, {"lock_timeout": "abc"}, {"lock": "maybe"}, {"fsync": 2}],
    ids=["negative-lock-timeout", "non-numeric-lock-timeout", "string-lock", "number-fsync"],
)
def test_invalid_directory_storage_option_values(tmp_path: Any, options: dict[str, Any]) -> None:
    """A directory endpoint's storage option values must be validated at open like the settings are."""
    with pytest.raises(fsrdzv.ConfigurationError) as info:
        fsrdzv.open_store(str(tmp_path / "rdzv"), "run", storage_options=options)
    _check_message(info.value, next(iter(options)))


@pytest.mark.parametrize(
    "run_id",
    [
        *["", ".", "..", "../escape", "a/b", "/abs", "a\\b", "a b", "job\x00x", "job\n", "job\r\n", ".hidden"],
        *["-flag", "é", "x" * 129, 42, None],
    ],
)
def test_invalid_run_id_characters(tmp_path: Any, run_id: Any) -> None:
    """Run ids outside ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` are refused by open_store (directory and memory) and
    create_handler with a ConfigurationError that shows the value and what to use; nothing is created. 17 ids."""
    endpoint = str(tmp_path / "rdzv")
    for call in (
        lambda: fsrdzv.open_store(endpoint, run_id),
        lambda: fsrdzv.open_store("memory://ids", run_id),
        lambda: fsrdzv.create_handler(endpoint, run_id, 1, 1),
    ):
        with pytest.raises(fsrdzv.ConfigurationError) as info:
            call()
        _check_message(info.value, f"invalid run id {run_id!r}", "letters, digits", "$SLURM_JOB_ID")
    assert not os.path.exists(endpoint)


def test_join_request_for_another_node_name_is_harmless(tmp_path: Any) -> None:
    """A record whose file name and payload disagree (a request copied under another name) folds the node named in
    the payload once, never a node called after the file: nothing is duplicated."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    store = fsrdzv.open_store(endpoint, rid)
    real = fsrdzv.create_handler(endpoint, rid, 1, 2, local_addr="10.0.0.1", last_call_timeout=0.2)
    node = NodeInfo("10.0.0.1", os.getpid(), 99999, "feed01", 1, "h")
    store.put_record("req", "copied-name", encode_request(JoinRequest(node, "n1")))
    info = real.next_rendezvous()
    snap = store.read()
    assert snap is not None
    state = fsrdzv._state.decode_state(snap.data, "t")
    assert "copied-name" not in state.nodes
    assert len(state.members()) == info.world_size <= 2
    real.shutdown()
