"""No request hangs: an endpoint that accepts connections and never answers (a silent drop) fails a request within
seconds on S3, GCS and Azure, as a refused connection does, with one StorageError line.

The same storage options bound every object store's requests: ``connect_timeout`` and ``read_timeout`` (seconds).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import fsrdzv
from fsrdzv import StorageError
from fsrdzv._stores._object import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT
from tests.servers import free_port

AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A TCP server that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def _endpoint(kind: str, port: int, **extra: Any) -> tuple[str, dict[str, Any]]:
    options: dict[str, Any]
    if kind == "s3":
        options = {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }
        url = "s3://bucket/prefix"
    elif kind == "gcs":
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"}
        url = "gs://bucket/prefix"
    else:
        options = {
            "connection_string": "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        }
        url = "az://container/prefix"
    return url, {**options, "skip_selftest": True, **extra}


def _time_to_error(kind: str, port: int, **extra: Any) -> tuple[float, str]:
    url, options = _endpoint(kind, port, **extra)
    store = fsrdzv.open_store(url, "run", storage_options=options)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.put_record("hb", "node", b'{"n":1}')
    return time.monotonic() - start, str(info.value)


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_a_silent_endpoint_fails_within_seconds(kind: str) -> None:
    with _silent_server() as port:
        silent, message = _time_to_error(kind, port)
    refused, refused_message = _time_to_error(kind, free_port())
    print(f"\n{kind}: silent endpoint {silent:.1f} s ({message}); refused {refused:.1f} s ({refused_message})")
    assert "\n" not in message
    assert "timed out" in message or "no valid response" in message or "cannot connect" in message, message
    # One attempt, and at most one retry of it, within the read timeout: never botocore's or the SDKs' minute.
    assert silent <= 2 * (DEFAULT_CONNECT_TIMEOUT + DEFAULT_READ_TIMEOUT) + 2, silent


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_the_timeouts_are_storage_options(kind: str) -> None:
    with _silent_server() as port:
        silent, _ = _time_to_error(kind, port, connect_timeout=0.5, read_timeout=0.5)
    assert silent <= 4, silent


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_a_bad_timeout_is_one_line(kind: str) -> None:
    url, options = _endpoint(kind, 1, read_timeout="soon")
    with pytest.raises(fsrdzv.ConfigurationError) as info:
        fsrdzv.open_store(url, "run", storage_options=options)
    assert "read_timeout" in str(info.value) and "\n" not in str(info.value)
