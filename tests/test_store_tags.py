"""Records' tags without their bodies (``Store.record_tag``) and the heartbeat tags a peer watch uses.

The conformance suite checks the contract on every store; here: wrappers see tag reads through their own
``read_record`` when they change it (faults and counts stay honest), a store that only implements the abstract
methods gets a tag from a read, and with a job secret a forged heartbeat never counts as a change, so it cannot keep
a dead node alive.
"""

from __future__ import annotations

import errno
import uuid
from pathlib import Path
from typing import Any

import pytest

from fsrdzv import StorageError, Store, open_store
from fsrdzv._admin import RunAdmin
from fsrdzv._liveness import LivenessTracker
from fsrdzv._store import SealedStore
from fsrdzv._storewrap import StoreWrapper

SECRET = b"s" * 32


class _CountingReads(StoreWrapper):
    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.reads = 0

    def read_record(self, kind: str, name: str) -> bytes | None:
        self.reads += 1
        return super().read_record(kind, name)


@pytest.fixture(params=["dir", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = str(tmp_path / "rdzv") if request.param == "dir" else f"memory://tags-{uuid.uuid4().hex[:8]}"
    return open_store(url, "run")


def test_a_plain_wrapper_passes_tags_through(store: Store) -> None:
    store.put_record("hb", "n", b'{"n":1}')
    assert StoreWrapper(store).record_tag("hb", "n") == store.record_tag("hb", "n")


def test_a_wrapper_that_changes_record_reads_sees_tag_reads(store: Store) -> None:
    store.put_record("hb", "n", b'{"n":1}')
    wrapper = _CountingReads(store)
    first = wrapper.record_tag("hb", "n")
    assert wrapper.reads == 1 and first is not None
    store.put_record("hb", "n", b'{"n":2}')
    assert wrapper.record_tag("hb", "n") not in (None, first)
    assert wrapper.record_tag("hb", "missing") is None


def test_the_directory_tag_is_the_file_identity_not_its_content(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "rdzv"), "run")
    store.put_record("hb", "n", b'{"n":1}')
    first = store.record_tag("hb", "n")
    store.put_record("hb", "n", b'{"n":1}')  # the same bytes again: still a new write (a new file)
    assert store.record_tag("hb", "n") not in (None, first)


def _admins(url: str) -> tuple[Store, RunAdmin, Store]:
    """The peer's signed store, a watcher's RunAdmin on a signed store, and a forger's store (no secret)."""
    peer = open_store(url, "run", secret=SECRET)
    watcher = RunAdmin(open_store(url, "run", secret=SECRET))
    return peer, watcher, open_store(url, "run")


@pytest.mark.parametrize("kind", ["dir", "memory"])
def test_signed_heartbeats_are_verified_and_forgeries_never_count(kind: str, tmp_path: Path) -> None:
    url = str(tmp_path / "rdzv") if kind == "dir" else f"memory://forged-{uuid.uuid4().hex[:8]}"
    peer, watcher, forger = _admins(url)
    peer.put_record("hb", "p", b'{"n":1}')
    first = watcher.heartbeat_tags(["p"])
    peer.put_record("hb", "p", b'{"n":2}')
    second = watcher.heartbeat_tags(["p"])
    assert first["p"] != second["p"]
    assert watcher.session.ops["get"] == 2 and watcher.session.ops["tag"] == 0
    # The peer died; someone without the secret keeps rewriting its heartbeat.
    tracker = LivenessTracker(timeout=3.0)
    tracker.observe(second, 0.0, ["p"])
    for t in range(1, 5):
        forger.put_record("hb", "p", b'{"n":%d}' % (100 + t))
        tags = watcher.heartbeat_tags(["p"])
        assert tags == second
        tracker.observe(tags, float(t), ["p"])
    assert tracker.dead(["p"], 4.0) == {"p"}


def test_a_forged_first_heartbeat_is_never_a_heartbeat(tmp_path: Path) -> None:
    peer, watcher, forger = _admins(str(tmp_path / "rdzv"))
    forger.put_record("hb", "p", b'{"n":1}')
    first = watcher.heartbeat_tags(["p"])
    forger.put_record("hb", "p", b'{"n":2}')
    assert watcher.heartbeat_tags(["p"]) == first
    peer.put_record("hb", "p", b'{"n":3}')  # a real one counts again
    assert watcher.heartbeat_tags(["p"]) != first


def test_unsigned_heartbeat_tags_read_no_bodies(store: Store) -> None:
    watcher = RunAdmin(store)
    store.put_record("hb", "p", b'{"n":1}')
    first = watcher.heartbeat_tags(["p", "gone"])
    assert set(first) == {"p"}
    store.put_record("hb", "p", b'{"n":2}')
    assert watcher.heartbeat_tags(["p"]) != first
    assert watcher.session.ops["tag"] == 3 and watcher.session.ops["get"] == 0


def test_gcs_writes_and_tags_ask_for_the_generation_alone(gcs_endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On GCS a heartbeat is one upload and a tag one metadata request: both ask for ``fields=generation``, so that
    the answer is the generation alone (GCS's partial response), not the 700-1,000 bytes of the object resource.
    fake-gcs-server ignores ``fields`` and answers the whole resource: the request is what can be checked here."""
    import requests

    store = open_store(gcs_endpoint.url, f"fields-{uuid.uuid4().hex[:8]}", storage_options=gcs_endpoint.storage_options)
    sent: list[tuple[str, str]] = []
    original = requests.Session.request

    def recording(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        sent.append((method, url))
        return original(self, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", recording)
    store.put_record("hb", "n1", b'{"n":1}')
    first = store.compare_and_set(b"document 1", None)
    assert first.won and first.snapshot is not None
    assert store.compare_and_set(b"document 2", first.snapshot.token).won
    assert not store.compare_and_set(b"document 3", first.snapshot.token).won  # a stale generation still loses
    assert store.record_tag("hb", "n1") is not None
    uploads = [url for method, url in sent if method == "POST" and "/upload/" in url]
    tags = [url for method, url in sent if method == "GET" and "/o/" in url and "alt=media" not in url]
    assert len(uploads) == 4 and tags
    assert all("fields=generation" in url for url in uploads + tags), sent


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_signed_heartbeats_count_from_tags_alone_on_object_stores(kind: str, request: pytest.FixtureRequest) -> None:
    """With a job secret on S3, GCS and Azure (their emulators), the ring watch reads a peer's heartbeat once; after
    that each newer beat is recognised from its tag alone (the MD5 of the stored bytes, which the watcher predicts
    with the secret), even after a skipped beat: no body. An older record written back, or a forged one, is no
    change."""
    endpoint = request.getfixturevalue(f"{kind}_endpoint")
    run_id = f"signed-{uuid.uuid4().hex[:8]}"
    writer = open_store(endpoint.url, run_id, storage_options=endpoint.storage_options, secret=SECRET)
    assert isinstance(writer, SealedStore)
    admin = RunAdmin(open_store(endpoint.url, run_id, storage_options=endpoint.storage_options, secret=SECRET))
    assert admin.session.store.capabilities.content_tags
    rest = b',"addrs":["10.0.0.1"],"host":"node-1","boot":"0123456789ab"}'
    writer.put_record("hb", "peer", b'{"n":1' + rest)
    old = writer._read_record("hb", "peer")
    assert old is not None
    tags = [admin.heartbeat_tags(["peer"])["peer"]]
    bodies = admin.session.ops["get"]
    for count in (2, 3, 5):  # 5: the watcher missed beat 4
        writer.put_record("hb", "peer", b'{"n":%d' % count + rest)
        tags.append(admin.heartbeat_tags(["peer"])["peer"])
    assert len(set(tags)) == 4
    assert admin.session.ops["get"] == bodies  # no body read after the first
    writer._put_record("hb", "peer", old)
    assert admin.heartbeat_tags(["peer"])["peer"] == tags[-1]
    open_store(endpoint.url, run_id, storage_options=endpoint.storage_options).put_record("hb", "peer", b'{"n":9}')
    assert admin.heartbeat_tags(["peer"])["peer"] == tags[-1]  # forged: unsigned
    writer.put_record("hb", "peer", b'{"n":6' + rest)
    assert admin.heartbeat_tags(["peer"])["peer"] not in tags


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_signed_sweeps_count_listed_beats_from_tags_alone(kind: str, request: pytest.FixtureRequest) -> None:
    """The sweeps' listing carries the same content tags as a tag request on S3, GCS and Azure (ETag, ``md5Hash``,
    Content-MD5), so with a job secret a sweep reads each peer's heartbeat once and then recognises every newer
    beat from the listing alone. A replayed older record is no change."""
    from fsrdzv._records import BeatFilter
    from fsrdzv._session import Session

    endpoint = request.getfixturevalue(f"{kind}_endpoint")
    run_id = f"sweep-{uuid.uuid4().hex[:8]}"
    writer = open_store(endpoint.url, run_id, storage_options=endpoint.storage_options, secret=SECRET)
    assert isinstance(writer, SealedStore)
    observer = open_store(endpoint.url, run_id, storage_options=endpoint.storage_options, secret=SECRET)
    session = Session(observer)
    sweeps = BeatFilter(session)
    rest = b',"addrs":["10.0.0.%d"],"host":"node-%d","boot":"0123456789ab"}'
    for peer in range(3):
        writer.put_record("hb", f"p{peer}", b'{"n":1' + rest % (peer, peer))
    assert observer.list_records("hb")["p0"] == observer.record_tag("hb", "p0")
    first = sweeps.tags()
    assert set(first) == {"p0", "p1", "p2"} and session.ops["get"] == 3
    old = writer._read_record("hb", "p1")
    for count in (2, 4):  # 4: a sweep missed beat 3
        for peer in range(3):
            writer.put_record("hb", f"p{peer}", b'{"n":%d' % count + rest % (peer, peer))
        tags = sweeps.tags()
        assert all(tags[name] != first[name] for name in tags) and len(tags) == 3
        first = tags
    assert session.ops["get"] == 3  # no body read after each peer's first
    assert old is not None
    writer._put_record("hb", "p1", old)
    assert sweeps.tags() == first  # the replay: read, and no change
    assert sweeps.tags() == first and session.ops["get"] == 4  # read once, not at every sweep


class _FailingOnce(StoreWrapper):
    """Its next record read fails with a storage error (one injected fault)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.fail = False

    def read_record(self, kind: str, name: str) -> bytes | None:
        if self.fail:
            self.fail = False
            raise StorageError(errno.EIO, "injected: the storage did not answer")
        return super().read_record(kind, name)


def test_a_signed_beat_whose_read_failed_is_judged_again(tmp_path: Path) -> None:
    """A sweep's read of a changed signed heartbeat that fails with a storage error leaves the tag unjudged: the
    next sweep reads it again and the newer beat counts (it must not be taken as no change for good)."""
    from fsrdzv._records import BeatFilter
    from fsrdzv._session import Session

    url = str(tmp_path / "rdzv")
    peer = open_store(url, "run", secret=SECRET)
    observer = _FailingOnce(open_store(url, "run", secret=SECRET))
    sweeps = BeatFilter(Session(observer))
    peer.put_record("hb", "p", b'{"n":1}')
    first = sweeps.tags()["p"]
    peer.put_record("hb", "p", b'{"n":2}')
    observer.fail = True
    with pytest.raises(StorageError):
        sweeps.tags()
    assert sweeps.tags()["p"] != first


def test_a_forged_heartbeat_is_reported_once_by_the_sweeps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With a job secret, a sweep that finds an unsigned heartbeat says so (``ignoring heartbeat: ...``) once for
    that record, not at every sweep, and leaves it out."""
    from fsrdzv._records import BeatFilter
    from fsrdzv._session import Session

    url = str(tmp_path / "rdzv")
    open_store(url, "run").put_record("hb", "forged", b'{"n":1}')
    sweeps = BeatFilter(Session(open_store(url, "run", secret=SECRET)))
    with caplog.at_level("WARNING", logger="fsrdzv"):
        assert sweeps.tags() == {} and sweeps.tags() == {}
    reports = [r for r in caplog.records if r.getMessage().startswith("ignoring heartbeat: ")]
    assert len(reports) == 1, caplog.text
