"""A conditional write whose answer is lost: the server applied it, the connection broke before the answer
arrived, and the client library sent the write again (botocore, google-cloud-storage and azure-core all retry a
broken connection). The retry fails its condition because of the first attempt itself. The store must report
that write as won: reported as lost, its caller writes the same change again (a counter counts one increment
twice) or gives up a write that stands.

The fault is real, not mocked: a TCP relay in front of the real server (moto, fake-gcs-server, Azurite) forwards
the first conditional write of the document, lets the server answer it, and closes the client's connection
instead of forwarding the answer.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from typing import Any

import fsrdzv
from tests.servers import Endpoint

#: A request line of a write, and the conditions the stores send with a document write (records have none).
_WRITE = re.compile(rb"^(PUT|POST) ")
_CONDITION = re.compile(rb"if-match:|if-none-match:|ifgenerationmatch=", re.IGNORECASE)


class _LosingRelay:
    """Relays connections to ``127.0.0.1:upstream``; drops the answer of the first conditional write once armed."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.armed = False
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> _LosingRelay:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._sockets += [client, server]
            swallow = threading.Event()
            self._spawn(self._requests, client, server, swallow)
            self._spawn(self._answers, server, client, swallow)

    def _requests(self, client: socket.socket, server: socket.socket, swallow: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                if self.armed and _WRITE.match(chunk) and _CONDITION.search(chunk):
                    self.armed = False
                    swallow.set()  # from here on, this connection's answers never reach the client
                server.sendall(chunk)

    def _answers(self, server: socket.socket, client: socket.socket, swallow: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                # An interim "100 Continue" (botocore's Expect header) asks for the body: the write is not made yet.
                if swallow.is_set() and not chunk.startswith(b"HTTP/1.1 100"):
                    self.dropped += 1
                    client.shutdown(socket.SHUT_RDWR)  # the server answered; the client sees a broken connection
                    client.close()
                    return
                client.sendall(chunk)


def _through(endpoint: Endpoint, relay_port: int) -> dict[str, Any]:
    text = json.dumps(endpoint.storage_options)
    return dict(json.loads(re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{relay_port}", text)))


def _upstream(endpoint: Endpoint) -> int:
    found = re.search(r"127\.0\.0\.1:(\d+)", json.dumps(endpoint.storage_options))
    assert found, endpoint.storage_options
    return int(found.group(1))


def test_a_write_whose_answer_was_lost_is_won(object_endpoint: Endpoint) -> None:
    with _LosingRelay(_upstream(object_endpoint)) as relay:
        options = {**_through(object_endpoint, relay.port), "skip_selftest": True}
        store = fsrdzv.open_store(object_endpoint.url, "lost-answer", storage_options=options)
        created = store.compare_and_set(b"1", None)
        assert created.won and created.snapshot is not None
        relay.armed = True
        result = store.compare_and_set(b"2", created.snapshot.token)
        assert relay.dropped == 1, "the relay did not drop the answer of the write"
        assert result.won, "a write that the server applied was reported as lost"
        assert result.snapshot is not None and result.snapshot.data == b"2" and result.snapshot.generation == 2
        snap = store.read()
        assert snap is not None and snap.data == b"2" and snap.token == result.snapshot.token
        # The token it returned is the current one: the next write wins with it.
        assert store.compare_and_set(b"3", result.snapshot.token).won
        store.close()


def test_a_create_whose_answer_was_lost_is_won(object_endpoint: Endpoint) -> None:
    with _LosingRelay(_upstream(object_endpoint)) as relay:
        options = {**_through(object_endpoint, relay.port), "skip_selftest": True}
        store = fsrdzv.open_store(object_endpoint.url, "lost-create", storage_options=options)
        relay.armed = True
        result = store.compare_and_set(b"first", None)
        assert relay.dropped == 1, "the relay did not drop the answer of the create"
        assert result.won and result.snapshot is not None and result.snapshot.generation == 1
        store.close()
