"""``s3://bucket/prefix``: Amazon S3 and S3-compatible stores that honour conditional writes, through s3fs.

Layout of one run::

    <prefix>/<run_id>/state                  the document: one object, written only with a condition
    <prefix>/<run_id>/records/<kind>/<name>  per-node records (plain overwrites; one writer per name)
    <prefix>/.fsrdzv-probe/<uuid>            short-lived objects of the start-up self-test

Compare-and-set is one ``PutObject``: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to update. A failed
condition answers 412 (or 404 when the object vanished under an If-Match), and that is a lost race, not an error.
409 ``ConditionalRequestConflict`` means another request on the key overlapped ours and nothing was written: it is
retried a few times with jittered backoff, then reported as lost. The version in a token is the ETag. ETags are
MD5s and repeat for equal bodies, but every document body carries its own generation in the envelope, so no two
generations share an ETag (no ABA).

Reads are one ``GetObject`` returning body and ETag together (``cat_file`` would add a HEAD and lose the ETag).
s3fs is asynchronous underneath; every request of this module goes through :meth:`S3Store._call`, which runs it
on s3fs's event loop and is the single place where botocore and s3fs exceptions are translated.

Configuration: ``storage_options`` go to ``s3fs.S3FileSystem`` (``endpoint_url``, ``key``, ``secret``, ``anon``,
``client_kwargs``, ``config_kwargs``, ...), and everything s3fs and botocore read from the environment works too
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``FSSPEC_S3_*``). fsrdzv adds one option of its own, ``skip_selftest``.
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

from .._errors import ConfigurationError, RendezvousError, StorageError, UnsupportedStoreError
from .._store import Store, validate_run_id
from ._selftest import (
    PROBE_DIR,
    check_kind,
    jittered_backoff,
    join_key,
    one_line,
    split_rest,
    verify_conditional_writes,
)

__all__ = ["S3Store"]

log = logging.getLogger("fsrdzv.store.s3")

_T = TypeVar("_T")

#: Attempts of a write answered with 409 ConditionalRequestConflict before it is reported as lost.
CONFLICT_ATTEMPTS: Final = 4
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
# Answers that say "conditional writes are not available here" rather than "this request was wrong".
_UNSUPPORTED_CODES: Final = frozenset({"NotImplemented"})


class _Answer(Exception):
    """An expected non-2xx answer (412, 404 on a key, 409 conflict): raised by the boundary, handled by callers."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(status, code)
        self.status = status
        self.code = code

    @property
    def lost(self) -> bool:
        """The precondition did not hold: 412, or 404 for an If-Match on a key that was deleted meanwhile."""
        return self.status == 412 or self.missing_key

    @property
    def missing_key(self) -> bool:
        # HEAD answers carry no body, hence no code but the status ("404").
        return self.status == 404 and self.code in {"NoSuchKey", "404", "NotFound"}

    @property
    def conflict(self) -> bool:
        return self.status == 409 and self.code in {"ConditionalRequestConflict", "OperationAborted"}


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


def _filesystem(opts: dict[str, Any]) -> Any:
    """An S3FileSystem for merged options, with fsrdzv's defaults where the user configured nothing."""
    opts = dict(opts)
    # Listings must be fresh: nodes appear and leave between two listings of the records.
    opts["use_listings_cache"] = False
    config = dict(opts.get("config_kwargs") or {})
    if "retries" not in config and not os.environ.get("AWS_MAX_ATTEMPTS") and not os.environ.get("AWS_RETRY_MODE"):
        # botocore's legacy mode spends ~8 s on an unreachable endpoint; the rendezvous retries on its own terms.
        config["retries"] = {"mode": "standard", "max_attempts": 3}
    opts["config_kwargs"] = config
    return s3fs.S3FileSystem(**opts)


def _configured_endpoint(options: dict[str, Any]) -> str | None:
    url = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    return url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3Store(Store):
    """A run's document and records under ``s3://bucket/prefix/<run_id>/``.

    :param rest: ``"bucket/prefix"`` (the prefix may be empty or have several levels).
    :param storage_options: passed to ``s3fs.S3FileSystem``, except ``skip_selftest`` (bool): do not check at
        open that the endpoint honours conditional writes (saves about five requests; only for endpoints known
        to be safe).
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
        bucket, prefix = split_rest(rest, "s3")
        super().__init__(run_id, "s3://" + join_key(bucket, prefix), secret)
        options = dict(storage_options or {})
        skip_selftest = bool(options.pop("skip_selftest", False))
        self.bucket = bucket
        self.prefix = prefix
        self.state_key = join_key(prefix, run_id, "state")
        self.records_prefix = join_key(prefix, run_id, "records") + "/"
        self.run_prefix = join_key(prefix, run_id) + "/"
        # Merge fsspec's configuration first, so that defaults only fill what nobody set and the endpoint named
        # in messages and in the self-test cache is the one FSSPEC_S3_ENDPOINT_URL may have set.
        options = _merged_options(options)
        self._configured_endpoint = _configured_endpoint(options)
        self._sleep: Callable[[float], None] = time.sleep
        self._fs = self._open_filesystem(options)
        if not skip_selftest:
            verify_conditional_writes(
                self,
                cache_key=("s3", self._configured_endpoint, bucket, prefix),
                prefix=prefix,
                location=self.where,
                conditions=_CONDITIONS,
            )

    def _open_filesystem(self, options: dict[str, Any]) -> Any:
        try:
            return _filesystem(options)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid storage_options for {self.location}: {one_line(exc)}") from None

    # -- the boundary ----------------------------------------------------------------------------------------

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

    async def _send(self, method: str, **kwargs: Any) -> Any:
        """One S3 API call through s3fs (which adds ``s3_additional_kwargs`` and throttling retries)."""
        return await self._fs._call_s3(method, **kwargs)

    def _call(self, what: str, op: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``op`` on s3fs's loop; translate every foreign exception (the one place this module does so)."""
        try:
            result: _T = fsspec.asyn.sync(self._fs.loop, op)
            return result
        except RendezvousError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: everything foreign is translated here
            raise self._translate(exc, what) from None

    def _translate(self, exc: Exception, what: str) -> Exception:
        log.debug("S3 request failed: %s at %s", what, self.where, exc_info=exc)
        prefix = f"S3 {what} at {self.where} failed"
        details = _client_error(exc)
        if details is not None:
            status, code, message = details
            answer = _Answer(status, code)
            if answer.lost or answer.missing_key or answer.conflict:
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

    # -- raw requests (each one call through the boundary) ---------------------------------------------------

    def _get(self, key: str, what: str) -> tuple[bytes, str] | None:
        async def op() -> tuple[bytes, str]:
            response = await self._send("get_object", Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                data: bytes = await body.read()
            return data, str(response["ETag"])

        try:
            data, etag = self._call(what, op)
        except _Answer as answer:
            if answer.missing_key:
                return None
            raise self._unexpected(answer, what) from None
        return data, etag.strip('"')

    def _put(self, key: str, data: bytes, what: str, **conditions: str) -> str | None:
        """PUT ``data``; return the new ETag, or None when a condition did not hold (retrying 409 conflicts)."""
        delays = jittered_backoff(CONFLICT_ATTEMPTS - 1)
        while True:
            try:
                response = self._call(
                    what, lambda: self._send("put_object", Bucket=self.bucket, Key=key, Body=data, **conditions)
                )
            except _Answer as answer:
                if answer.lost:
                    return None
                if not answer.conflict:
                    raise self._unexpected(answer, what) from None
                # 409: a concurrent request on this key overlapped ours and nothing was written; AWS says retry.
                delay = next(delays, None)
                if delay is None:
                    log.info("S3 kept answering 409 ConditionalRequestConflict to %s; reporting it as lost", what)
                    return None
                self._sleep(delay)
                continue
            return str(response["ETag"]).strip('"')

    def _delete(self, key: str, what: str) -> None:
        try:
            self._call(what, lambda: self._send("delete_object", Bucket=self.bucket, Key=key))
        except _Answer as answer:
            if not answer.missing_key:
                raise self._unexpected(answer, what) from None

    def _list(self, prefix: str, what: str, delimiter: str = "") -> tuple[dict[str, str], list[str]]:
        """All keys under ``prefix`` with their ETags, and the common prefixes when a delimiter is given."""

        async def op() -> tuple[dict[str, str], list[str]]:
            keys: dict[str, str] = {}
            prefixes: list[str] = []
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            while True:
                page = await self._send("list_objects_v2", **kwargs)
                for item in page.get("Contents", []):
                    keys[item["Key"]] = str(item.get("ETag", "")).strip('"')
                prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    return keys, prefixes
                kwargs["ContinuationToken"] = token

        try:
            return self._call(what, op)
        except _Answer as answer:
            raise self._unexpected(answer, what) from None

    def _unexpected(self, answer: _Answer, what: str) -> StorageError:
        return StorageError(
            errno.EIO, f"S3 {what} at {self.where} failed: unexpected HTTP {answer.status} {answer.code}"
        )

    # -- the store -------------------------------------------------------------------------------------------

    def _read_raw(self) -> tuple[bytes, str] | None:
        return self._get(self.state_key, "read of the document")

    def _commit(self, raw: bytes, generation: int, expected: tuple[int, str] | None) -> str | None:
        what = f"conditional write of generation {generation}"
        if expected is None:
            return self._put(self.state_key, raw, what, IfNoneMatch="*")
        if not expected[1]:
            return None
        return self._put(self.state_key, raw, what, IfMatch=f'"{expected[1]}"')

    def _record_key(self, kind: str, name: str) -> str:
        return f"{self.records_prefix}{check_kind(kind)}/{name}"

    def _put_record(self, kind: str, name: str, raw: bytes) -> None:
        self._put(self._record_key(kind, name), raw, f"write of record {kind}/{name}")

    def _read_record(self, kind: str, name: str) -> bytes | None:
        got = self._get(self._record_key(kind, name), f"read of record {kind}/{name}")
        return None if got is None else got[0]

    def _list_records(self, kind: str) -> dict[str, str]:
        # One paginated listing; the ETags are the tags, so no record is read.
        prefix = f"{self.records_prefix}{check_kind(kind)}/"
        keys, _ = self._list(prefix, f"listing of records {kind}", delimiter="/")
        return {key[len(prefix) :]: etag for key, etag in keys.items()}

    def _delete_record(self, kind: str, name: str) -> None:
        self._delete(self._record_key(kind, name), f"delete of record {kind}/{name}")

    def delete_run(self) -> None:
        keys, _ = self._list(self.run_prefix, "listing of the run")
        names = sorted(keys)
        for start in range(0, len(names), _DELETE_BATCH):
            self._delete_batch(names[start : start + _DELETE_BATCH])

    def _delete_batch(self, keys: list[str]) -> None:
        what = "delete of the run's objects"
        request = {"Objects": [{"Key": k} for k in keys], "Quiet": True}
        try:
            response = self._call(what, lambda: self._send("delete_objects", Bucket=self.bucket, Delete=request))
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

    def corrupt_for_tests(self, raw: bytes) -> None:
        """Overwrite the document with raw bytes, unconditionally (conformance tests of corrupt documents)."""
        self._put(self.state_key, raw, "raw write of the document")

    # -- self-test operations (see _selftest) ----------------------------------------------------------------

    def probe_create(self, key: str, data: bytes) -> str | None:
        return self._put(key, data, "self-test create", IfNoneMatch="*")

    def probe_update(self, key: str, data: bytes, version: str) -> str | None:
        return self._put(key, data, "self-test update", IfMatch=f'"{version}"')

    def probe_delete(self, key: str) -> None:
        self._delete(key, "self-test delete")

    # -- runs ------------------------------------------------------------------------------------------------

    @classmethod
    def list_runs(cls, rest: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
        """Run ids under ``s3://rest`` that hold a document: one delimited listing, then one HEAD per run."""
        options = dict(storage_options or {})
        options["skip_selftest"] = True  # listing only reads
        # Any valid run id opens the store; it only borrows the client and the boundary.
        store = cls(rest, "list-runs", storage_options=options)
        base = store.prefix + "/" if store.prefix else ""
        _, prefixes = store._list(base, "listing of runs", delimiter="/")
        candidates = []
        for p in prefixes:
            name = p[len(base) :].rstrip("/")
            if name == PROBE_DIR:
                continue
            try:
                candidates.append(validate_run_id(name))
            except ConfigurationError:
                continue

        async def exists(run_id: str) -> bool:
            try:
                await store._send("head_object", Bucket=store.bucket, Key=join_key(store.prefix, run_id, "state"))
            except Exception as exc:
                details = _client_error(exc)
                if details is not None and _Answer(details[0], details[1]).missing_key:
                    return False
                raise
            return True

        async def check_all() -> list[bool]:
            return list(await asyncio.gather(*(exists(r) for r in candidates)))

        found = store._call("check of the runs' documents", check_all)
        return sorted(r for r, ok in zip(candidates, found, strict=True) if ok)
