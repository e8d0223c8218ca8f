"""``gs://bucket/prefix`` (also ``gcs://``): Google Cloud Storage, through google-cloud-storage.

Layout of one run (as for S3)::

    <prefix>/<run_id>/state                  the document: one object, written only with a precondition
    <prefix>/<run_id>/records/<kind>/<name>  per-node records (plain overwrites)
    <prefix>/.fsrdzv-probe/<uuid>            short-lived objects of the start-up self-test

Compare-and-set is one upload with ``ifGenerationMatch``: ``0`` to create ("no live object"), the object's
generation to update. A failed precondition answers 412 (also for an update of an object that is gone), which is
a lost race. The version in a token is the generation as a string. Generations change on every write but are not
ordered; the envelope's own generation is what orders documents.

gcsfs is not used: it has no generation-match update. Options: ``project``, ``token`` (gcsfs's values: ``"anon"``
for emulators, ``"google_default"``, ``"cloud"``, a path to a JSON key file, a dict, or a Credentials object),
``credentials``, ``endpoint_url`` (else ``STORAGE_EMULATOR_HOST`` is honoured, with anonymous credentials, by the
client library itself), ``timeout`` (seconds per request), ``retry_timeout`` (seconds of retries of a transient
failure, default 10) and fsrdzv's ``skip_selftest``.

GCS allows about one write per second to the same object name; contention on the document beyond that is
answered with 429 and retried within ``retry_timeout`` by the client library.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

import google.auth
import requests
from google.api_core import exceptions as api_exc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from .._errors import ConfigurationError, RendezvousError, StorageError
from .._store import Store, validate_run_id
from ._selftest import PROBE_DIR, check_kind, join_key, one_line, split_rest, verify_conditional_writes

__all__ = ["GcsStore"]

log = logging.getLogger("fsrdzv.store.gcs")

_T = TypeVar("_T")

_KNOWN_OPTIONS: Final = frozenset(
    {"project", "token", "credentials", "endpoint_url", "timeout", "retry_timeout", "skip_selftest"}
)
#: Default seconds of retries of transient failures per operation (the library default is 120).
DEFAULT_RETRY_TIMEOUT: Final = 10.0
#: Default seconds per HTTP request.
DEFAULT_TIMEOUT: Final = 60.0
_SCOPES: Final = ["https://www.googleapis.com/auth/devstorage.read_write"]
_CONDITIONS: Final = "ifGenerationMatch"
_CONTENT_TYPE: Final = "application/octet-stream"

_STATUS_HINTS: Final[dict[int, tuple[int, str]]] = {
    401: (errno.EACCES, "not authenticated; check the token / credentials (token='anon' only for emulators)"),
    403: (errno.EACCES, "access denied; the credentials need storage.objects get, create, delete and list here"),
    429: (errno.EAGAIN, "too many requests (GCS allows about one write per second per object); retry later"),
    503: (errno.EAGAIN, "the service is unavailable; retry later"),
}


class _Answer(Exception):
    """An expected non-2xx answer (412 precondition, 404): raised by the boundary, handled by callers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    @property
    def lost(self) -> bool:
        return self.status == 412

    @property
    def missing(self) -> bool:
        return self.status == 404


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


class GcsStore(Store):
    """A run's document and records under ``gs://bucket/prefix/<run_id>/``.

    :param rest: ``"bucket/prefix"`` (the prefix may be empty or have several levels).
    :param storage_options: see the module docstring; ``skip_selftest=True`` skips the conditional-write check.
    """

    enforces_conditions = True  # checked against the service by the self-test at open

    def __init__(
        self,
        rest: str,
        run_id: str,
        *,
        storage_options: dict[str, Any] | None = None,
        secret: bytes | None = None,
    ) -> None:
        bucket, prefix = split_rest(rest, "gs")
        super().__init__(run_id, "gs://" + join_key(bucket, prefix), secret)
        options = dict(storage_options or {})
        unknown = set(options) - _KNOWN_OPTIONS
        if unknown:
            raise ConfigurationError(
                f"unknown storage option(s) {sorted(unknown)} for {self.location}; known: {sorted(_KNOWN_OPTIONS)}"
            )
        self.bucket_name = bucket
        self.prefix = prefix
        self.state_key = join_key(prefix, run_id, "state")
        self.records_prefix = join_key(prefix, run_id, "records") + "/"
        self.run_prefix = join_key(prefix, run_id) + "/"
        self.endpoint_url = str(options.get("endpoint_url") or "")
        self._timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        self._retry: Retry = DEFAULT_RETRY.with_timeout(float(options.get("retry_timeout", DEFAULT_RETRY_TIMEOUT)))
        self._client = self._call("client set-up", lambda: self._make_client(options))
        if not self.endpoint_url:
            self.endpoint_url = str(getattr(self._client, "api_endpoint", None) or "Google Cloud Storage")
        self._bucket = self._client.bucket(bucket)
        if not options.get("skip_selftest"):
            verify_conditional_writes(
                self,
                cache_key=("gs", self.endpoint_url, bucket, prefix),
                prefix=prefix,
                location=self.where,
                conditions=_CONDITIONS,
            )

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

    # -- the boundary ----------------------------------------------------------------------------------------

    def _call(self, what: str, op: Callable[[], _T]) -> _T:
        """Run one client operation; translate every foreign exception (the one place this module does so)."""
        try:
            return op()
        except RendezvousError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: everything foreign is translated here
            raise self._translate(exc, what) from None

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
            if status in (404, 412):
                return _Answer(status, message)
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

    def _missing_bucket(self, what: str, answer: _Answer) -> StorageError:
        return StorageError(
            errno.ENOENT,
            f"GCS {what} at {self.where} failed: HTTP 404: {answer.message}; create bucket {self.bucket_name!r}, "
            "or fix the bucket name or endpoint_url",
        )

    def _unexpected(self, answer: _Answer, what: str) -> StorageError:
        return StorageError(
            errno.EIO, f"GCS {what} at {self.where} failed: unexpected HTTP {answer.status}: {answer.message}"
        )

    # -- raw requests ----------------------------------------------------------------------------------------

    def _get(self, key: str, what: str) -> tuple[bytes, str] | None:
        def op() -> tuple[bytes, str]:
            blob = self._bucket.blob(key)
            data: bytes = blob.download_as_bytes(retry=self._retry, timeout=self._timeout)
            if blob.generation is None:
                # No x-goog-generation header (a proxy stripped it): fetch the generation, then download exactly
                # that generation, so that data and version always belong together.
                blob.reload(retry=self._retry, timeout=self._timeout)
                generation = blob.generation
                data = blob.download_as_bytes(
                    if_generation_match=generation, retry=self._retry, timeout=self._timeout
                )
            return data, str(blob.generation)

        try:
            return self._call(what, op)
        except _Answer as answer:
            if answer.missing and "bucket does not exist" in answer.message.lower():
                # GCS says so for a missing bucket ("No such object: ..." otherwise); emulators may not tell.
                raise self._missing_bucket(what, answer) from None
            if answer.missing:
                return None
            if answer.lost:  # the object changed between the two requests of the fallback: read again
                return self._get(key, what)
            raise self._unexpected(answer, what) from None

    def _put(self, key: str, data: bytes, what: str, generation: int | None = None) -> str | None:
        """Upload ``data``; with ``generation`` only if the live generation is that (0: only if absent)."""

        def op() -> str:
            blob = self._bucket.blob(key)
            blob.upload_from_string(
                data,
                content_type=_CONTENT_TYPE,
                if_generation_match=generation,
                retry=self._retry,
                timeout=self._timeout,
            )
            return str(blob.generation)

        try:
            return self._call(what, op)
        except _Answer as answer:
            if answer.lost and generation is not None:
                return None
            if answer.missing:
                # An upload creates the object, so a 404 can only mean the bucket is missing.
                raise self._missing_bucket(what, answer) from None
            raise self._unexpected(answer, what) from None

    def _delete(self, key: str, what: str) -> None:
        try:
            self._call(what, lambda: self._bucket.blob(key).delete(retry=self._retry, timeout=self._timeout))
        except _Answer as answer:
            if not answer.missing:
                raise self._unexpected(answer, what) from None

    def _list(self, prefix: str, what: str, delimiter: str | None = None) -> tuple[dict[str, str], set[str]]:
        """Objects under ``prefix`` with their generations, and the sub-prefixes when a delimiter is given."""

        def op() -> tuple[dict[str, str], set[str]]:
            iterator = self._client.list_blobs(
                self._bucket,
                prefix=prefix or None,
                delimiter=delimiter,
                fields="items(name,generation),nextPageToken,prefixes",
                retry=self._retry,
                timeout=self._timeout,
            )
            objects = {blob.name: str(blob.generation) for blob in iterator}
            return objects, set(iterator.prefixes)

        try:
            return self._call(what, op)
        except _Answer as answer:
            if answer.missing:
                raise self._missing_bucket(what, answer) from None
            raise self._unexpected(answer, what) from None

    # -- the store -------------------------------------------------------------------------------------------

    def _read_raw(self) -> tuple[bytes, str] | None:
        return self._get(self.state_key, "read of the document")

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        what = f"conditional write of generation {generation}"
        if expected is None:
            return self._put(self.state_key, raw, what, generation=0)
        if not expected[1].isdigit() or int(expected[1]) == 0:
            return None  # not a GCS generation: a foreign token can never match
        return self._put(self.state_key, raw, what, generation=int(expected[1]))

    def _record_key(self, kind: str, name: str) -> str:
        return f"{self.records_prefix}{check_kind(kind)}/{name}"

    def _put_record(self, kind: str, name: str, raw: bytes) -> None:
        self._put(self._record_key(kind, name), raw, f"write of record {kind}/{name}")

    def _read_record(self, kind: str, name: str) -> bytes | None:
        got = self._get(self._record_key(kind, name), f"read of record {kind}/{name}")
        return None if got is None else got[0]

    def _list_records(self, kind: str) -> dict[str, str]:
        # One paginated listing; generations are the tags (they change on every write), so no record is read.
        prefix = f"{self.records_prefix}{check_kind(kind)}/"
        objects, _ = self._list(prefix, f"listing of records {kind}", delimiter="/")
        return {key[len(prefix) :]: gen for key, gen in objects.items()}

    def _delete_record(self, kind: str, name: str) -> None:
        self._delete(self._record_key(kind, name), f"delete of record {kind}/{name}")

    def delete_run(self) -> None:
        objects, _ = self._list(self.run_prefix, "listing of the run")
        # GCS has no multi-object delete in the JSON API (batches are not universally supported: the emulator
        # rejects them); a few threads keep a run of thousands of records from taking minutes.
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda key: self._delete(key, "delete of a run object"), sorted(objects)))

    def corrupt_for_tests(self, raw: bytes) -> None:
        """Overwrite the document with raw bytes, unconditionally (conformance tests of corrupt documents)."""
        self._put(self.state_key, raw, "raw write of the document")

    def close(self) -> None:
        self._client.close()

    # -- self-test operations (see _selftest) ----------------------------------------------------------------

    def probe_create(self, key: str, data: bytes) -> str | None:
        return self._put(key, data, "self-test create", generation=0)

    def probe_update(self, key: str, data: bytes, version: str) -> str | None:
        return self._put(key, data, "self-test update", generation=int(version))

    def probe_delete(self, key: str) -> None:
        self._delete(key, "self-test delete")

    # -- runs ------------------------------------------------------------------------------------------------

    @classmethod
    def list_runs(cls, rest: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
        """Run ids under ``gs://rest`` that hold a document: one delimited listing, then one check per run."""
        options = dict(storage_options or {})
        options["skip_selftest"] = True  # listing only reads
        store = cls(rest, "list-runs", storage_options=options)
        try:
            base = store.prefix + "/" if store.prefix else ""
            _, prefixes = store._list(base, "listing of runs", delimiter="/")
            candidates = []
            for name in (p[len(base) :].rstrip("/") for p in prefixes):
                if name == PROBE_DIR:
                    continue
                try:
                    candidates.append(validate_run_id(name))
                except ConfigurationError:
                    continue

            def has_state(run_id: str) -> bool:
                blob = store._bucket.blob(join_key(store.prefix, run_id, "state"))
                return bool(
                    store._call(
                        "check of a run's document", lambda: blob.exists(retry=store._retry, timeout=store._timeout)
                    )
                )

            with ThreadPoolExecutor(max_workers=8) as pool:
                found = list(pool.map(has_state, candidates))
            return sorted(r for r, ok in zip(candidates, found, strict=True) if ok)
        finally:
            store.close()
