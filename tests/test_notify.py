"""Waking waiting nodes on a commit in a local directory (inotify), and falling back to polling everywhere else."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any

import pytest

import fsrdzv
from fsrdzv._stores._notify import watch_directories

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


def _rid() -> str:
    return f"notify-{uuid.uuid4().hex[:8]}"


@linux_only
def test_a_commit_wakes_the_watch_at_once(tmp_path: Any) -> None:
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    store = fsrdzv.open_store(endpoint, rid)
    watch = store.change_watch()
    assert watch is not None
    writer = fsrdzv.open_store(endpoint, rid)
    timer = threading.Timer(0.2, lambda: writer.compare_and_set(b"one", None))
    started = time.monotonic()
    timer.start()
    assert watch.wait(5.0) is True
    assert 0.15 < time.monotonic() - started < 2.0
    timer.join()
    watch.close()


@linux_only
def test_no_commit_means_a_full_sleep_and_records_do_not_wake(tmp_path: Any) -> None:
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    store = fsrdzv.open_store(endpoint, rid)
    store.compare_and_set(b"one", None)
    watch = store.change_watch()
    assert watch is not None
    store.put_record("hb", "node-a", b"1")  # records live elsewhere: not a change of the document
    started = time.monotonic()
    assert watch.wait(0.3) is False
    assert time.monotonic() - started >= 0.29
    watch.close()
    assert watch.wait(0.05) is False  # a closed watch just sleeps


def test_unwatchable_places_fall_back_to_polling(tmp_path: Any) -> None:
    assert watch_directories([(str(tmp_path / "does-not-exist"), bytes.isdigit)]) is None
    assert fsrdzv.open_store(f"memory://{_rid()}", "run").change_watch() is None


class _RecordedWatches:
    """The watches a handler asked its store for (by record kinds), and whether each was closed again."""

    def __init__(self, handler: fsrdzv.RendezvousHandler) -> None:
        self.made: dict[tuple[str, ...], Any] = {}
        self.closed: set[tuple[str, ...]] = set()
        store = handler.store
        make = store.change_watch

        def change_watch(kinds: tuple[str, ...] = (), document: bool = True) -> Any:
            watch = make(kinds, document=document)
            self.made[kinds] = watch
            if watch is not None:
                close = watch.close

                def closing() -> None:
                    self.closed.add(kinds)
                    close()

                watch.close = closing  # type: ignore[method-assign]
            return watch

        store.change_watch = change_watch  # type: ignore[method-assign]

    def folder(self) -> bool:
        """Whether the handler slept on join requests (only the folder does)."""
        return self.made.get(("req", "done")) is not None


@linux_only
def test_a_waiting_node_sees_completion_without_waiting_for_its_poll(tmp_path: Any) -> None:
    """Two nodes (min=max=2): the second's arrival completes the round; the first, waiting with the real sleep,
    returns within a few milliseconds of the completing write rather than at its next poll."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    first = fsrdzv.create_handler(endpoint, rid, 2, 2, local_addr="10.0.0.1")
    second = fsrdzv.create_handler(endpoint, rid, 2, 2, local_addr="10.0.0.2")
    done: dict[str, float] = {}
    watches = _RecordedWatches(first)

    def wait_first() -> None:
        first.next_rendezvous()
        done["first"] = time.monotonic()

    thread = threading.Thread(target=wait_first)
    thread.start()
    time.sleep(1.5)  # the first node's poll has grown to its slowest while the round forms (240 ms)
    second.next_rendezvous()
    done["second"] = time.monotonic()
    thread.join(10)
    assert watches.folder()  # the first node waited alone: it was the folder
    assert done["first"] - done["second"] < 0.15
    for h in (first, second):
        h.shutdown()
    assert watches.closed == {kinds for kinds, watch in watches.made.items() if watch is not None}
    assert os.listdir(os.path.join(endpoint, rid, "records", "req")) == []


@linux_only
def test_the_folders_watch_also_wakes_on_a_new_join_request(tmp_path: Any) -> None:
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    store = fsrdzv.open_store(endpoint, rid)
    folder_watch, plain_watch = store.change_watch(("req",)), store.change_watch()
    assert folder_watch is not None and plain_watch is not None
    timer = threading.Timer(0.2, lambda: store.put_record("req", "i.request", b"{}"))
    timer.start()
    assert folder_watch.wait(5.0) is True
    timer.join()
    assert plain_watch.wait(0.2) is False  # a request alone does not wake every waiting node
    folder_watch.close()
    plain_watch.close()


@linux_only
def test_the_completing_write_is_announced_to_the_nodes_that_do_not_fold(tmp_path: Any) -> None:
    """Three nodes (min=max=3) on a directory: the first waits as folder, the second as a plain waiting node
    sleeping on the announcement watch (not on every new generation). The third's arrival wakes the folder, whose
    fold completes the round and rewrites records/done/round; the second returns within milliseconds of that write
    rather than at its next poll (240 ms by then)."""
    endpoint, rid = str(tmp_path / "rdzv"), _rid()
    handlers = [fsrdzv.create_handler(endpoint, rid, 3, 3, local_addr=f"10.0.0.{i + 1}") for i in range(3)]
    watches = [_RecordedWatches(h) for h in handlers]
    done: dict[int, float] = {}

    def wait(i: int) -> None:
        handlers[i].next_rendezvous()
        done[i] = time.monotonic()

    threads = [threading.Thread(target=wait, args=(i,)) for i in (0, 1)]
    threads[0].start()
    time.sleep(0.5)
    threads[1].start()
    time.sleep(1.5)  # both polls have grown to their slowest while the round forms
    wait(2)
    for t in threads:
        t.join(10)
    assert watches[0].folder()  # the folder slept on requests
    assert not watches[1].folder() and watches[1].made[("done",)] is not None
    assert os.listdir(os.path.join(endpoint, rid, "records", "done")) == ["round"]
    assert done[1] - done[0] < 0.15
    # The plain waiting node never wrote; the round was completed by the folder or by the last arrival's own fold.
    assert handlers[1].ops["cas"] == 0
    for h in handlers:
        h.shutdown()
