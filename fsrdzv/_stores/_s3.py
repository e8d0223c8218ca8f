"""``s3://bucket/prefix``: Amazon S3 and S3-compatible stores that honour conditional writes, through s3fs.

Keys follow the layout of every object store (``<prefix>/<run_id>/state`` and records; see ``_object``).

Compare-and-set is one ``PutObject``: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to update. A failed
condition answers 412 (or 404 when the object vanished under an If-Match), and that is a lost race, not an error.
409 ``ConditionalRequestConflict`` means another request on the key overlapped ours and nothing was written: it is
retried a few times with jittered backoff, then reported as lost. The version in a token is the ETag. ETags are
MD5s and repeat for equal bodies, but every document body carries its own generation in the envelope, so no two
generations share an ETag (no ABA).

Reads are one ``GetObject`` returning body and ETag together (``cat_file`` would add a HEAD and lose the ETag).
s3fs is asynchronous underneath; every request of this module runs on s3fs's event loop (``S3Store._run``) inside
``ObjectStore._call``, and :meth:`S3Store._translate` is the single place where botocore and s3fs exceptions are
translated.

Configuration: ``storage_options`` go to ``s3fs.S3FileSystem`` (``endpoint_url``, ``key``, ``secret``, ``anon``,
``client_kwargs``, ``config_kwargs``, ...), and everything s3fs and botocore read from the environment works too
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``FSSPEC_S3_*``). fsrdzv adds options of its own: ``skip_selftest``, and
``connect_timeout`` / ``read_timeout`` (seconds; botocore's own, given in ``config_kwargs``, take precedence).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

import fsspec.asyn
import s3fs
from botocore import exceptions as boto_exc
from fsspec.config import apply_config

from .._errors import ConfigurationError, StorageError, UnsupportedStoreError
from .._retry import Retry
from .._text import one_line
from ._object import ExpectedAnswerError, ObjectStore, batches

__all__ = ["S3Store"]

log = logging.getLogger("fsrdzv.store.s3")

_T = TypeVar("_T")

#: Attempts of a write answered with 409 ConditionalRequestConflict before it is reported as lost.
CONFLICT_ATTEMPTS: Final = 4
#: Pauses between those attempts: full jitter, up to 0.05 s doubling to at most 1 s (the centre of the jitter is
#: half of that).
_CONFLICT_DELAY: Final = 0.025
_CONFLICT_MAX_DELAY: Final = 0.5
#: Keys per DeleteObjects request (the S3 maximum).
_DELETE_BATCH: Final = 1000
_CONDITIONS: Final = "If-None-Match/If-Match"

# Error codes mapped to (errno, hint). The hint says what to do; the code and server message are appended.
_CODE_HINTS: Final[dict[str, tuple[int, str]]] = {
    "NoSuchBucket": (errno.ENOENT, "the bucket does not exist; create it, or fix the bucket name or endpoint_url"),
    "AccessDenied": (
        errno.EACCES,
        "access denied; the credentials need s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket "
        "on this prefix",
    ),
    "AllAccessDisabled": (errno.EACCES, "all access to this bucket is disabled"),
    "InvalidAccessKeyId": (errno.EACCES, "the access key is unknown here; check AWS_ACCESS_KEY_ID / 'key'"),
    "SignatureDoesNotMatch": (errno.EACCES, "the secret key is wrong; check AWS_SECRET_ACCESS_KEY / 'secret'"),
    "ExpiredToken": (errno.EACCES, "the session token has expired; refresh the credentials"),
    "InvalidToken": (errno.EACCES, "the session token is invalid; refresh the credentials"),
    "PermanentRedirect": (errno.EIO, "the bucket is in another region; set AWS_DEFAULT_REGION or client_kwargs"),
    "AuthorizationHeaderMalformed": (errno.EIO, "wrong region for this bucket; set AWS_DEFAULT_REGION"),
    "SlowDown": (errno.EAGAIN, "the service is throttling requests; retry later"),
    "ServiceUnavailable": (errno.EAGAIN, "the service is unavailable; retry later"),
    "InternalError": (errno.EIO, "the service had an internal error; retry later"),
}
# ExpectedAnswerErrors that say "conditional writes are not available here" rather than "this request was wrong".
_UNSUPPORTED_CODES: Final = frozenset({"NotImplemented"})


class _Answer(ExpectedAnswerError):
    """An expected non-2xx answer (412, 404 on a key, 409 conflict)."""

    @property
    def missing(self) -> bool:
        # HEAD answers carry no body, hence no code but the status ("404").
        return self.status == 404 and self.code in {"NoSuchKey", "404", "NotFound"}

    @property
    def lost(self) -> bool:
        """The precondition did not hold: 412, or 404 for an If-Match on a key that was deleted meanwhile."""
        return self.status == 412 or self.missing

    @property
    def conflict(self) -> bool:
        return self.status == 409 and self.code in {"ConditionalRequestConflict", "OperationAborted"}


class _Conflict(StorageError):
    """A 409 conflict: a concurrent request on the key overlapped ours and nothing was written (retried on a put)."""


def _client_error(exc: BaseException) -> tuple[int, str, str] | None:
    """``(status, code, message)`` of a botocore ClientError, raised directly or attached as cause by s3fs."""
    for candidate in (exc, exc.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            error = response["Error"]
            status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            return status, str(error.get("Code") or ""), str(error.get("Message") or "")
    return None


def _merged_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over fsspec's configuration for s3 (``FSSPEC_S3_*``, config files), as s3fs would see them."""
    merged: dict[str, Any] = apply_config(s3fs.S3FileSystem, dict(options))
    return merged


def _filesystem(opts: dict[str, Any], timeouts: tuple[float, float]) -> Any:
    """An S3FileSystem for merged options, with fsrdzv's defaults where the user configured nothing."""
    opts = dict(opts)
    # Listings must be fresh: nodes appear and leave between two listings of the records.
    opts["use_listings_cache"] = False
    config = dict(opts.get("config_kwargs") or {})
    # fsrdzv's connect_timeout/read_timeout (or their defaults) unless config_kwargs names botocore's own.
    config.setdefault("connect_timeout", timeouts[0])
    config.setdefault("read_timeout", timeouts[1])
    if "retries" not in config and not os.environ.get("AWS_MAX_ATTEMPTS") and not os.environ.get("AWS_RETRY_MODE"):
        # botocore's legacy mode spends ~8 s on an unreachable endpoint; the rendezvous retries on its own terms.
        config["retries"] = {"mode": "standard", "max_attempts": 3}
    opts["config_kwargs"] = config
    fs = s3fs.S3FileSystem(**opts)
    # botocore retries (above); s3fs would retry each of its attempts again (5 times: 15 attempts of a read that
    # times out), so one request of a silent endpoint would hold the caller for a minute.
    fs.retries = 1
    return fs


def _configured_endpoint(options: dict[str, Any]) -> str | None:
    url = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    return url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3Store(ObjectStore):
    """A run's document and records under ``s3://bucket/prefix/<run_id>/``.

    :param rest: ``"bucket/prefix"`` (the prefix may be empty or have several levels).
    :param storage_options: passed to ``s3fs.S3FileSystem``, except ``skip_selftest`` (bool): do not check at
        open that the endpoint honours conditional writes (saves about five requests; only for endpoints known
        to be safe).
    """

    service = "S3"
    scheme = "s3"
    conditions = _CONDITIONS

    def _connect(self, bucket: str, options: dict[str, Any]) -> str | None:
        self.bucket = bucket
        # Merge fsspec's configuration first, so that defaults only fill what nobody set and the endpoint named
        # in messages and in the self-test cache is the one FSSPEC_S3_ENDPOINT_URL may have set.
        options = _merged_options(options)
        self._configured_endpoint = _configured_endpoint(options)
        self._sleep: Callable[[float], None] = time.sleep
        self._fs = self._open_filesystem(options)
        return self._configured_endpoint

    def _open_filesystem(self, options: dict[str, Any]) -> Any:
        try:
            return _filesystem(options, (self.connect_timeout, self.read_timeout))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid storage_options for {self.location}: {one_line(exc)}") from None

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint actually used (the client's once created, else the configured one), for messages."""
        # ``_s3``, not ``s3``: the public property would connect just to name the endpoint in a message.
        client = getattr(self._fs, "_s3", None)
        url = getattr(getattr(client, "meta", None), "endpoint_url", None)
        return str(url or self._configured_endpoint or "AWS S3")

    @property
    def where(self) -> str:
        return f"{self.location} (endpoint {self.endpoint_url})"

    # -- the boundary ----------------------------------------------------------------------------------------

    async def _send(self, method: str, **kwargs: Any) -> Any:
        """One S3 API call through s3fs (which adds ``s3_additional_kwargs``), with botocore's retries, bounded as a
        whole: a PUT waiting for an answer of a silent endpoint is not covered by botocore's read timeout."""
        call = self._fs._call_s3(method, **kwargs)  # noqa: SLF001 - s3fs's one call path
        return await asyncio.wait_for(call, 2 * (self.connect_timeout + self.read_timeout))

    def _run(self, op: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``op`` on s3fs's event loop (inside :meth:`_call`, which translates what it raises)."""
        result: _T = fsspec.asyn.sync(self._fs.loop, op)
        return result

    def _translate(self, exc: Exception, what: str) -> Exception:
        log.debug("S3 request failed: %s at %s", what, self.where, exc_info=exc)
        prefix = f"S3 {what} at {self.where} failed"
        details = _client_error(exc)
        if details is not None:
            status, code, message = details
            answer = _Answer(status, code)
            if answer.lost or answer.conflict or answer.not_modified:
                return answer
            if code in _UNSUPPORTED_CODES:
                return UnsupportedStoreError(
                    f"{prefix}: {code}: {one_line(message)}; this endpoint does not implement conditional "
                    f"writes ({_CONDITIONS}), which fsrdzv needs"
                )
            number, hint = _CODE_HINTS.get(
                code,
                (errno.EACCES, "access denied; check the credentials")
                if status == 403
                else (errno.EIO, "check the endpoint and the bucket"),
            )
            if code == "NoSuchBucket":
                hint = f"create bucket {self.bucket!r}, or fix the bucket name or endpoint_url"
            return StorageError(number, f"{prefix}: {code or status}: {one_line(message)}; {hint}")
        if isinstance(exc, boto_exc.ParamValidationError):
            return ConfigurationError(f"{prefix}: {one_line(exc)}; check the bucket name in the endpoint")
        if isinstance(exc, (boto_exc.NoCredentialsError, boto_exc.PartialCredentialsError)):
            return StorageError(
                errno.EACCES,
                f"{prefix}: {one_line(exc)}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass "
                "key/secret (anon=True for public buckets) in storage_options",
            )
        if isinstance(exc, (boto_exc.EndpointConnectionError, boto_exc.ConnectTimeoutError, ConnectionError)):
            return StorageError(
                errno.ECONNREFUSED,
                f"{prefix}: cannot connect ({one_line(exc)}); check endpoint_url / AWS_ENDPOINT_URL and the network",
            )
        if isinstance(exc, (boto_exc.ReadTimeoutError, TimeoutError, asyncio.TimeoutError)):
            return StorageError(errno.ETIMEDOUT, f"{prefix}: timed out ({one_line(exc)}); the endpoint is slow")
        if isinstance(exc, OSError) and exc.errno:
            return StorageError(exc.errno, f"{prefix}: {one_line(exc)}; check the endpoint and the bucket")
        return StorageError(errno.EIO, f"{prefix}: {type(exc).__name__}: {one_line(exc)}; check the endpoint")

    def _unexpected(self, answer: ExpectedAnswerError, what: str) -> StorageError:
        error = super()._unexpected(answer, what)
        # A conflict is retried by _put; to any other request it is as unexpected as any other answer.
        return _Conflict(error.errno, error.strerror) if isinstance(answer, _Answer) and answer.conflict else error

    # -- raw requests (see ObjectStore) ----------------------------------------------------------------------

    def _sdk_get(self, key: str, limit: int, unless: str | None) -> tuple[bytes, str, int]:
        condition = {} if unless is None else {"IfNoneMatch": f'"{unless}"'}

        async def op() -> tuple[bytes, str, int]:
            response = await self._send("get_object", Bucket=self.bucket, Key=key, **condition)
            size = int(response.get("ContentLength") or 0)
            async with response["Body"] as body:
                # The size is in the headers: an oversized object is refused before its body is read.
                data: bytes = b"" if size > limit else await body.read()
            return data, str(response["ETag"]).strip('"'), max(size, len(data))

        return self._run(op)

    def _sdk_head(self, key: str) -> str:
        response = self._run(lambda: self._send("head_object", Bucket=self.bucket, Key=key))
        return str(response["ETag"]).strip('"')

    def _sdk_put(self, key: str, data: bytes, *, create: bool, match: str | None) -> str:
        conditions = {"IfNoneMatch": "*"} if create else {} if match is None else {"IfMatch": f'"{match}"'}
        response = self._run(lambda: self._send("put_object", Bucket=self.bucket, Key=key, Body=data, **conditions))
        return str(response["ETag"]).strip('"')

    def _put(self, key: str, data: bytes, what: str, *, create: bool = False, match: str | None = None) -> str | None:
        """As :meth:`ObjectStore._put`, retrying 409 conflicts a few times before reporting them as lost."""
        attempts = Retry(_CONFLICT_DELAY, _CONFLICT_MAX_DELAY, max_jitter=1.0, sleep=self._sleep).attempts()
        for _ in range(CONFLICT_ATTEMPTS - 1):
            try:
                return super()._put(key, data, what, create=create, match=match)
            except _Conflict:
                # 409: a concurrent request on this key overlapped ours and nothing was written; AWS says retry.
                attempts.pause()
        try:
            return super()._put(key, data, what, create=create, match=match)
        except _Conflict:
            log.info("S3 kept answering 409 ConditionalRequestConflict to %s; reporting it as lost", what)
            return None

    def _sdk_delete(self, key: str) -> None:
        self._run(lambda: self._send("delete_object", Bucket=self.bucket, Key=key))

    async def _pages(self, prefix: str, delimiter: str = "") -> list[dict[str, Any]]:
        """Every page of a ListObjectsV2 of ``prefix``."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        pages = []
        while True:
            page = await self._send("list_objects_v2", **kwargs)
            pages.append(page)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return pages
            kwargs["ContinuationToken"] = token

    def _sdk_list(self, prefix: str, delimiter: str) -> tuple[dict[str, str], list[str]]:
        keys: dict[str, str] = {}
        prefixes: list[str] = []
        for page in self._run(lambda: self._pages(prefix, delimiter)):
            for item in page.get("Contents", []):
                keys[item["Key"]] = str(item.get("ETag", "")).strip('"')
            prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        return keys, prefixes

    def _sdk_modified(self, prefix: str) -> list[float]:
        pages = self._run(lambda: self._pages(prefix))
        return [item["LastModified"].timestamp() for page in pages for item in page.get("Contents", [])]

    def _delete_many(self, keys: list[str]) -> None:
        for batch in batches(keys, _DELETE_BATCH):
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        what = "delete of the run's objects"
        request = {"Objects": [{"Key": k} for k in keys], "Quiet": True}
        try:
            response = self._call(
                what, lambda: self._run(lambda: self._send("delete_objects", Bucket=self.bucket, Delete=request))
            )
        except _Answer as answer:
            raise self._unexpected(answer, what) from None
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                errno.EIO,
                f"S3 {what} at {self.where} failed for {len(errors)} object(s), e.g. {first.get('Key')}: "
                f"{first.get('Code')} {one_line(first.get('Message', ''))}",
            )

    def _exist(self, keys: list[str]) -> list[bool]:
        """One HEAD per key, all at once on s3fs's loop."""

        async def exists(key: str) -> bool:
            try:
                await self._send("head_object", Bucket=self.bucket, Key=key)
            except Exception as exc:
                details = _client_error(exc)
                if details is not None and _Answer(details[0], details[1]).missing:
                    return False
                raise
            return True

        async def check_all() -> list[bool]:
            return list(await asyncio.gather(*(exists(key) for key in keys)))

        return self._call("check of the runs' documents", lambda: self._run(check_all))
