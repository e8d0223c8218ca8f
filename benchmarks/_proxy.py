"""A counting HTTP reverse proxy: every request to an emulator (moto, Azurite, fake-gcs-server) passes through it and
is counted by method, object, status and response bytes (body and headers apart).

It speaks HTTP/1.1 with keep-alive to both sides, so the SDKs behave as they do against the real service (one
connection per client, reused). Only what a benchmark needs: request bodies with Content-Length or chunked, whole
responses relayed after they arrived.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CountingProxy", "Tally"]

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Tally:
    """What went through the proxy while counting."""

    requests: int = 0
    body_bytes: int = 0
    header_bytes: int = 0
    request_bytes: int = 0
    #: (method, status) -> requests
    by_kind: Counter[tuple[str, int]] = field(default_factory=Counter)
    #: object path (without the query) -> requests
    by_object: Counter[str] = field(default_factory=Counter)
    #: (method, status) -> response body bytes
    body_by_kind: Counter[tuple[str, int]] = field(default_factory=Counter)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _relay(self) -> None:
        body = self._body()
        upstream = self.server.upstream_connection()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.server.drop_upstream()
            raise
        if response.getheader("Connection", "").lower() == "close":
            self.server.drop_upstream()
        self.send_response_only(response.status, response.reason)
        header_bytes = len(f"HTTP/1.1 {response.status} {response.reason}\r\n")
        for key, value in response.getheaders():
            if key.lower() in _HOP or key.lower() == "content-length":
                continue
            self.send_header(key, value)
            header_bytes += len(key) + len(value) + 4
        if self.command != "HEAD" or data:
            self.send_header("Content-Length", str(len(data)))
        else:
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.server.count(self.command, self.path, response.status, len(data), header_bytes, len(body))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _relay


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self._local = threading.local()
        self._lock = threading.Lock()
        self.counting = False
        self.tally = Tally()

    def upstream_connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
            self._local.conn = conn
        return conn

    def drop_upstream(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def count(self, method: str, path: str, status: int, body: int, headers: int, sent: int) -> None:
        if not self.counting:
            return
        key = urllib.parse.unquote(path.split("?", 1)[0])
        with self._lock:
            t = self.tally
            t.requests += 1
            t.body_bytes += body
            t.header_bytes += headers
            t.request_bytes += sent
            t.by_kind[(method, status)] += 1
            t.body_by_kind[(method, status)] += body
            t.by_object[key] += 1


class CountingProxy:
    """``with CountingProxy("http://127.0.0.1:PORT") as proxy:`` then point the client at ``proxy.url``."""

    def __init__(self, upstream: str) -> None:
        self._server = _Server(upstream)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def start_counting(self) -> float:
        with self._server._lock:
            self._server.tally = Tally()
            self._server.counting = True
        return time.monotonic()

    def stop_counting(self) -> Tally:
        with self._server._lock:
            self._server.counting = False
            return self._server.tally
