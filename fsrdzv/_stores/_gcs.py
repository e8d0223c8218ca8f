"""``gs://bucket/prefix`` (also ``gcs://``): Google Cloud Storage, through google-cloud-storage.

Keys follow the layout of every object store (``<prefix>/<run_id>/state`` and records; see ``_object``).

Compare-and-set is one upload with ``ifGenerationMatch``: ``0`` to create ("no live object"), the object's
generation to update. A failed precondition answers 412 (also for an update of an object that is gone), which is
a lost race. The version in a token is the generation as a string. Generations change on every write but are not
ordered; the envelope's own generation is what orders documents.

gcsfs is not used: it has no generation-match update. Options: ``project``, ``token`` (gcsfs's values: ``"anon"``
for emulators, ``"google_default"``, ``"cloud"``, a path to a JSON key file, a dict, or a Credentials object),
``credentials``, ``endpoint_url`` (else ``STORAGE_EMULATOR_HOST`` is honoured, with anonymous credentials, by the
client library itself), ``connect_timeout`` / ``read_timeout`` (seconds per request, as on S3 and Azure; ``timeout``
sets both), ``retry_timeout`` (seconds of retries of a transient failure, default 10) and fsrdzv's
``skip_selftest``.

GCS allows about one write per second to the same object name; contention on the document beyond that is
answered with 429 and retried within ``retry_timeout`` by the client library.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import re
import secrets
from typing import Any, Final

import google.auth
import google_crc32c
import requests
import urllib3
from google.api_core import exceptions as api_exc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from google.cloud.storage.retry import _should_retry as _library_retries

from .._errors import ConfigurationError, StorageError
from .._text import one_line
from ._object import TIMEOUT_OPTIONS, ExpectedAnswerError, ObjectStore, in_threads

__all__ = ["GcsStore"]

log = logging.getLogger("fsrdzv.store.gcs")

_KNOWN_OPTIONS: Final = frozenset(
    {"project", "token", "credentials", "endpoint_url", "timeout", "retry_timeout", "skip_selftest"} | TIMEOUT_OPTIONS
)
#: Default seconds of retries of transient failures per operation (the library default is 120).
DEFAULT_RETRY_TIMEOUT: Final = 10.0
#: Bytes the first request of a download fetches (documents are smaller).
FIRST_GET_BYTES: Final = 4 * 1024 * 1024
_SCOPES: Final = ["https://www.googleapis.com/auth/devstorage.read_write"]
_CONDITIONS: Final = "ifGenerationMatch"
_CONTENT_TYPE: Final = "application/octet-stream"

_STATUS_HINTS: Final[dict[int, tuple[int, str]]] = {
    401: (errno.EACCES, "not authenticated; check the token / credentials (token='anon' only for emulators)"),
    403: (errno.EACCES, "access denied; the credentials need storage.objects get, create, delete and list here"),
    429: (errno.EAGAIN, "too many requests (GCS allows about one write per second per object); retry later"),
    503: (errno.EAGAIN, "the service is unavailable; retry later"),
}


class _Answer(ExpectedAnswerError):
    """An expected non-2xx answer (412 precondition, 404)."""

    @property
    def missing(self) -> bool:
        # GCS says so for a missing bucket ("No such object: ..." otherwise); emulators may not tell.
        return self.status == 404 and "bucket does not exist" not in self.message.lower()

    @property
    def nothing_to_delete(self) -> bool:
        return self.status == 404

    @property
    def lost(self) -> bool:
        return self.status == 412

    @property
    def summary(self) -> str:
        return f"{self.status}: {self.message}"


def _timed_out(exc: BaseException) -> bool:
    # requests raises a timeout itself, or a ConnectionError around urllib3's, or google-auth wraps it.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return True
        inner = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = inner if inner is not seen else None
    return False


def _retried(exc: BaseException) -> bool:
    """The library's transient failures, except timeouts: a silent endpoint fails a request after one
    ``read_timeout`` (the rendezvous retries on its own terms) instead of for the whole retry budget."""
    return not _timed_out(exc) and bool(_library_retries(exc))


def _credentials(token: Any, credentials: Any) -> Any:
    """Credentials from gcsfs-style ``token`` values (None: let the client find the defaults)."""
    if credentials is not None:
        return credentials
    # (google-auth's functions carry no annotations, hence the ignores below.)
    how = token if isinstance(token, str) else None
    if token is None or how == "google_default":
        return None
    if how == "anon":
        return AnonymousCredentials()  # type: ignore[no-untyped-call]
    if how == "cloud":
        from google.auth import compute_engine

        return compute_engine.Credentials()  # type: ignore[no-untyped-call]
    if isinstance(token, dict):
        return google.auth.load_credentials_from_dict(token, scopes=_SCOPES)[0]  # type: ignore[no-untyped-call]
    if how is not None:
        return google.auth.load_credentials_from_file(how, scopes=_SCOPES)[0]  # type: ignore[no-untyped-call]
    return token  # a Credentials object


def _short_message(exc: api_exc.GoogleAPICallError) -> str:
    """The API's own error text ("No such object: ..."), not the request line and JSON body around it."""
    for error in exc.errors or ():
        if isinstance(error, dict) and error.get("message"):
            return one_line(error["message"], 200)
    # Upload errors come from the media layer with the JSON body inlined in the text.
    found = re.search(r'"message"\s*:\s*"([^"]+)"', str(exc.message))
    return one_line(found.group(1) if found else exc.message, 200)


class GcsStore(ObjectStore):
    """A run's document and records under ``gs://bucket/prefix/<run_id>/``.

    :param rest: ``"bucket/prefix"`` (the prefix may be empty or have several levels).
    :param storage_options: see the module docstring; ``skip_selftest=True`` skips the conditional-write check.
    """

    service = "GCS"
    scheme = "gs"
    conditions = _CONDITIONS
    known_options = _KNOWN_OPTIONS

    def _connect(self, bucket: str, options: dict[str, Any]) -> str | None:
        self.bucket_name = bucket
        self.endpoint_url = str(options.get("endpoint_url") or "")
        # (connect, read) seconds per request; ``timeout`` (one number for both) is the older spelling.
        legacy = options.get("timeout")
        self._timeout: float | tuple[float, float] = (
            float(legacy) if legacy is not None else (self.connect_timeout, self.read_timeout)
        )
        self._retry: Retry = DEFAULT_RETRY.with_timeout(
            float(options.get("retry_timeout", DEFAULT_RETRY_TIMEOUT))
        ).with_predicate(_retried)
        self._client = self._call("client set-up", lambda: self._make_client(options))
        if not self.endpoint_url:
            self.endpoint_url = str(getattr(self._client, "api_endpoint", None) or "Google Cloud Storage")
        self._bucket = self._client.bucket(bucket)
        return self.endpoint_url

    def _make_client(self, options: dict[str, Any]) -> Any:
        try:
            credentials = _credentials(options.get("token"), options.get("credentials"))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot load GCS credentials for {self.location}: {one_line(exc)}") from None
        client_options = {"api_endpoint": self.endpoint_url} if self.endpoint_url else None
        return storage.Client(project=options.get("project"), credentials=credentials, client_options=client_options)

    @property
    def where(self) -> str:
        return f"{self.location} (endpoint {self.endpoint_url or 'Google Cloud Storage'})"

    def close(self) -> None:
        self._client.close()

    # -- the boundary ----------------------------------------------------------------------------------------

    def _translate(self, exc: Exception, what: str) -> Exception:
        log.debug("GCS request failed: %s at %s", what, self.where, exc_info=exc)
        prefix = f"GCS {what} at {self.where} failed"
        if isinstance(exc, api_exc.RetryError) and isinstance(exc.cause, Exception):
            # The retry budget ran out; what matters is why the last attempt failed.
            inner = self._translate(exc.cause, what)
            if isinstance(inner, StorageError):
                return StorageError(inner.errno, f"{inner.strerror} (after retrying for {self._retry.timeout:g}s)")
            return inner
        if isinstance(exc, api_exc.GoogleAPICallError) and exc.code:
            status = int(exc.code)
            message = _short_message(exc)
            if status in (304, 404, 412):
                return _Answer(status, message=message)
            number, hint = _STATUS_HINTS.get(status, (errno.EIO, "check the endpoint and the bucket"))
            return StorageError(number, f"{prefix}: HTTP {status}: {message}; {hint}")
        if isinstance(exc, (auth_exc.DefaultCredentialsError, auth_exc.RefreshError)):
            return StorageError(
                errno.EACCES,
                f"{prefix}: {one_line(exc)}; set GOOGLE_APPLICATION_CREDENTIALS or storage_options token= "
                "(token='anon' for an emulator)",
            )
        if isinstance(exc, (requests.ConnectionError, auth_exc.TransportError, ConnectionError)):
            return StorageError(
                errno.ECONNREFUSED,
                f"{prefix}: cannot connect ({one_line(exc)}); check endpoint_url / STORAGE_EMULATOR_HOST and "
                "the network",
            )
        if isinstance(exc, (requests.Timeout, TimeoutError)):
            return StorageError(errno.ETIMEDOUT, f"{prefix}: timed out ({one_line(exc)}); the endpoint is slow")
        return StorageError(errno.EIO, f"{prefix}: {type(exc).__name__}: {one_line(exc)}; check the endpoint")

    def _unexpected(self, answer: ExpectedAnswerError, what: str) -> StorageError:
        if answer.status == 404:
            # A missing object is expected where it can be; anywhere else (an upload creates the object, a listing
            # needs none) a 404 can only mean that the bucket is missing.
            return StorageError(
                errno.ENOENT,
                f"GCS {what} at {self.where} failed: HTTP 404: {answer.message}; create bucket "
                f"{self.bucket_name!r}, or fix the bucket name or endpoint_url",
            )
        return super()._unexpected(answer, what)

    # -- raw requests (see ObjectStore) ----------------------------------------------------------------------

    def _could_match(self, version: str) -> bool:
        return version.isascii() and version.isdigit() and int(version) != 0  # a GCS generation

    def _sdk_get(self, key: str, limit: int, unless: str | None) -> tuple[bytes, str, int]:
        blob = self._bucket.blob(key)
        unchanged = None if unless is None else int(unless)
        # The first request fetches at most FIRST_GET_BYTES (documents are smaller); only a larger object costs
        # a metadata request (its size: an oversized one is refused unread) and then the rest of that generation.
        data = self._download(blob, 0, FIRST_GET_BYTES - 1, if_generation_not_match=unchanged)
        if blob.generation is None or len(data) >= FIRST_GET_BYTES:
            # Larger, or no x-goog-generation header (a proxy stripped it): fetch the metadata, then download
            # exactly that generation, so that data and version always belong together.
            blob.reload(retry=self._retry, timeout=self._timeout)
            size = int(blob.size or 0)
            if size > limit:
                return b"", str(blob.generation), size
            try:
                data = self._download(blob, 0, None, if_generation_match=blob.generation)
            except api_exc.PreconditionFailed:
                return self._sdk_get(key, limit, unless)  # the object changed between the two requests
        return data, str(blob.generation), len(data)

    def _download(self, blob: Any, start: int, end: int | None, **conditions: Any) -> bytes:
        try:
            data: bytes = blob.download_as_bytes(
                start=start, end=end, retry=self._retry, timeout=self._timeout, checksum=None, **conditions
            )
        except api_exc.RequestRangeNotSatisfiable:
            # An empty object has no byte 0 (416): its whole body is nothing.
            data = blob.download_as_bytes(retry=self._retry, timeout=self._timeout, checksum=None, **conditions)
        return data

    def _sdk_head(self, key: str) -> str:
        # The object's metadata with only its MD5 and generation (Blob.reload has no field selection; Blob.exists
        # asks with fields=name the same way): a few bytes of JSON instead of the whole resource. Composite objects
        # have no MD5: then the generation.
        blob = self._bucket.blob(key)
        resource = self._client._get_resource(  # noqa: SLF001 - the library's own metadata request
            blob.path, query_params={"fields": "generation,md5Hash"}, timeout=self._timeout, retry=self._retry
        )
        return _content_tag(resource.get("md5Hash"), resource["generation"])

    def _sdk_put(self, key: str, data: bytes, *, create: bool, match: str | None) -> str:
        # One multipart upload (metadata and data, as Blob.upload_from_string sends it) through the library's own
        # authenticated and retried JSON API request, with fields=generation: the answer is the new generation
        # alone, not the whole object resource that upload_from_string asks for (700-1,000 bytes per heartbeat;
        # it has no field selection). Not a simple media upload: fake-gcs-server ignores preconditions there.
        query: dict[str, Any] = {"uploadType": "multipart", "fields": "generation"}
        if create or match is not None:
            # 0: only if no live object; a generation: only if it is the live one; neither: unconditionally.
            query["ifGenerationMatch"] = 0 if create else int(match or 0)
        boundary = secrets.token_hex(16)
        crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
        metadata = json.dumps({"name": key, "contentType": _CONTENT_TYPE, "crc32c": crc})
        body = b"".join(
            (
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n".encode(),
                f"--{boundary}\r\nContent-Type: {_CONTENT_TYPE}\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )
        connection = self._client._connection  # noqa: SLF001 - the library's requests (auth, retries, errors)
        resource = connection.api_request(
            method="POST",
            path=f"{self._bucket.path}/o",
            api_base_url=connection.get_api_base_url_for_mtls() + "/upload",
            query_params=query,
            data=body,
            content_type=f'multipart/related; boundary="{boundary}"',
            retry=self._retry,
            timeout=self._timeout,
        )
        return str(resource["generation"])

    def _sdk_delete(self, key: str) -> None:
        self._bucket.blob(key).delete(retry=self._retry, timeout=self._timeout)

    def _sdk_list(self, prefix: str, delimiter: str) -> tuple[dict[str, str], list[str]]:
        iterator = self._client.list_blobs(
            self._bucket,
            prefix=prefix or None,
            delimiter=delimiter or None,
            fields="items(name,generation,md5Hash),nextPageToken,prefixes",
            retry=self._retry,
            timeout=self._timeout,
        )
        objects = {blob.name: _content_tag(blob.md5_hash, blob.generation) for blob in iterator}
        return objects, sorted(iterator.prefixes)

    def _sdk_modified(self, prefix: str) -> list[float]:
        iterator = self._client.list_blobs(
            self._bucket, prefix=prefix, fields="items(updated),nextPageToken", retry=self._retry, timeout=self._timeout
        )
        return [blob.updated.timestamp() for blob in iterator if blob.updated is not None]

    def _delete_many(self, keys: list[str]) -> None:
        # GCS has no multi-object delete in the JSON API (batches are not universally supported: the emulator
        # rejects them); a few threads keep a run of thousands of records from taking minutes.
        in_threads(lambda key: self._delete(key, "delete of a run object"), keys)

    def _exist(self, keys: list[str]) -> list[bool]:
        def exists(key: str) -> bool:
            blob = self._bucket.blob(key)
            return bool(
                self._call("check of a run's document", lambda: blob.exists(retry=self._retry, timeout=self._timeout))
            )

        return in_threads(exists, keys)


def _content_tag(md5: str | None, generation: object) -> str:
    """A record's tag: its MD5 (hex; ``StoreCapabilities.content_tags``), else (composite objects have none) its
    generation."""
    return base64.b64decode(md5).hex() if md5 else str(generation)
