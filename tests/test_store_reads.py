"""Cheap and bounded reads on every store: conditional reads (``read_if_changed``) and oversized objects.

An unchanged document is answered NOT_MODIFIED (on S3 and Azure by the service itself: a 304 without a body), a
changed one with its new snapshot. An object of 200 MB where the document (or a record) belongs is refused with the
same one-line StateCorruptError on a directory and on S3, GCS and Azure, without being loaded: the peak RSS of the
reading process stays under 100 MB (measured in a child process, on real emulators).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest

from fsrdzv import Store, open_store
from fsrdzv._store import NOT_MODIFIED, encode_name
from tests.servers import Endpoint

BIG = 200 * 1024 * 1024
RSS_LIMIT_MB = 100

_CHILD = textwrap.dedent(
    """
    import json, sys
    import fsrdzv
    from fsrdzv import StateCorruptError
    url, run_id, options, what = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    store = fsrdzv.open_store(url, run_id, storage_options=options)
    try:
        store.read() if what == "document" else store.read_record("hb", "node-1")
        message = None
    except StateCorruptError as exc:
        message = str(exc)
    # VmHWM: the peak of this program's memory (ru_maxrss would carry the parent's over fork and exec).
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"message": message, "rss_mb": peak / 1024}))
    """
)


def _run_id() -> str:
    return f"big-{uuid.uuid4().hex[:8]}"


def _child_read(url: str, run_id: str, options: dict[str, Any], env: dict[str, str], what: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, url, run_id, json.dumps(options), what],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _check_changes(store: Store) -> None:
    assert store.read_if_changed("1:nothing") is None  # no document yet
    first = store.compare_and_set(b"one", None).snapshot
    assert first is not None
    assert store.read_if_changed(first.token) is NOT_MODIFIED
    assert store.read_if_changed(first.token) is Store.NOT_MODIFIED
    second = store.compare_and_set(b"two", first.token).snapshot
    assert second is not None
    got = store.read_if_changed(first.token)
    assert got is not NOT_MODIFIED and got is not None
    assert (got.data, got.token, got.generation) == (b"two", second.token, 2)
    assert store.read_if_changed(second.token) is NOT_MODIFIED
    # A token of another kind never matches: the document is read.
    other = store.read_if_changed("garbage")
    assert other is not None and other is not NOT_MODIFIED and other.data == b"two"


def test_read_if_changed_on_object_stores(object_endpoint: Endpoint) -> None:
    store = open_store(object_endpoint.url, _run_id(), storage_options=object_endpoint.storage_options)
    assert store.capabilities.conditional_read
    _check_changes(store)


@pytest.mark.parametrize("url", ["dir", "memory"])
def test_read_if_changed_on_local_stores(url: str, tmp_path: os.PathLike[str]) -> None:
    endpoint = str(tmp_path) if url == "dir" else f"memory://reads-{uuid.uuid4().hex[:8]}"
    _check_changes(open_store(endpoint, _run_id()))


def _expected(where: str, limit: int) -> str:
    return f"{where} is {BIG} bytes, over the {limit}-byte limit; inspect it with 'fsrdzv status'"


def _place_big_object(store: Any, key: str) -> None:
    payload = b"x" * BIG
    store._sdk_put(key, payload, create=False, match=None)


@pytest.mark.parametrize("what", ["document", "record"])
def test_a_200_mb_object_is_refused_unread_on_object_stores(object_endpoint: Endpoint, what: str) -> None:
    run_id = _run_id()
    # Uploading 200 MB to an emulator takes longer than the default read timeout.
    setup = {**object_endpoint.storage_options, "read_timeout": 120}
    store: Any = open_store(object_endpoint.url, run_id, storage_options=setup)
    key = store.state_key if what == "document" else store._record_key("hb", encode_name("node-1"))
    _place_big_object(store, key)
    options = {**object_endpoint.storage_options, "skip_selftest": True}
    got = _child_read(object_endpoint.url, run_id, options, object_endpoint.env, what)
    where, limit = (
        (store.describe("document"), 32 * 1024 * 1024)
        if what == "document"
        else (store.describe("record hb/node-1"), 65536)
    )
    assert got["message"] is not None and "\n" not in got["message"]
    assert got["message"].startswith(_expected(where, limit)), got["message"]
    assert got["rss_mb"] <= RSS_LIMIT_MB, got
    print(f"\n{object_endpoint.url.split(':')[0]} {what}: peak RSS {got['rss_mb']:.0f} MB: {got['message']}")


@pytest.mark.parametrize("what", ["document", "record"])
def test_a_200_mb_file_is_refused_unread_on_a_directory(tmp_path: os.PathLike[str], what: str) -> None:
    run_id = _run_id()
    store: Any = open_store(str(tmp_path), run_id)
    store.compare_and_set(b"small", None)
    store.put_record("hb", "node-1", b"{}")
    path = store.state_path if what == "document" else os.path.join(store.records_dir, "hb", encode_name("node-1"))
    with open(path, "wb") as f:
        f.truncate(BIG)
    got = _child_read(str(tmp_path), run_id, {}, {}, what)
    where, limit = (
        (store.describe("document"), 32 * 1024 * 1024)
        if what == "document"
        else (store.describe("record hb/node-1"), 65536)
    )
    assert got["message"] is not None and "\n" not in got["message"]
    assert got["message"].startswith(_expected(where, limit)), got["message"]
    assert got["rss_mb"] <= RSS_LIMIT_MB, got
    print(f"\ndirectory {what}: peak RSS {got['rss_mb']:.0f} MB: {got['message']}")
