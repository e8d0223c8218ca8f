"""``az://container/prefix`` (also ``abfs://``, ``abfss://``): Azure Blob Storage, through azure-storage-blob.

Keys follow the layout of every object store (``<prefix>/<run_id>/state`` and records; see ``_object``).

Compare-and-set is one ``Put Blob``: ``upload_blob(overwrite=False)`` (``If-None-Match: *``) to create, which
answers 409 ``BlobAlreadyExists`` when it exists; ``upload_blob(overwrite=True, etag=..., match_condition=
IfNotModified)`` to update, which answers 412 ``ConditionNotMet`` when stale, and 412 or 404 ``BlobNotFound``
(Azurite) when the blob is gone. All of those are lost races. The version in a token is the ETag, which changes
on every write, even of identical bytes.

adlfs is not used for the data path (it does not map the 412 and adds a listing cache); its configuration names
are accepted for parity: ``connection_string``, ``account_name``, ``account_key``, ``sas_token``, ``credential``,
``anon``, ``tenant_id``/``client_id``/``client_secret``, ``account_host``, plus ``account_url``,
``client_kwargs`` (passed to ``BlobServiceClient``), ``connect_timeout`` / ``read_timeout`` (seconds per request, as
on S3 and GCS) and fsrdzv's ``skip_selftest``. Without options, the
environment is used: ``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT_NAME`` with
``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_TOKEN`` / ``DefaultAzureCredential``. ``abfs://`` URLs of the
form ``container@account.dfs.core.windows.net/prefix`` name the account themselves.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Final

from azure.core import MatchConditions
from azure.core import exceptions as az_exc
from azure.storage.blob import BlobPrefix, BlobProperties, BlobServiceClient, LinearRetry

from .._errors import ConfigurationError, RendezvousError, StorageError
from .._text import one_line
from ._object import TIMEOUT_OPTIONS, ExpectedAnswerError, ObjectStore, batches, in_threads

__all__ = ["AzureStore"]

log = logging.getLogger("fsrdzv.store.azure")

_KNOWN_OPTIONS: Final = frozenset(
    {
        "connection_string",
        "account_name",
        "account_key",
        "sas_token",
        "credential",
        "anon",
        "tenant_id",
        "client_id",
        "client_secret",
        "account_host",
        "account_url",
        "client_kwargs",
        "skip_selftest",
    }
    | TIMEOUT_OPTIONS
)
#: Bytes the first request of a download fetches (documents are smaller; the SDK default is 32 MiB).
FIRST_GET_BYTES: Final = 4 * 1024 * 1024
#: Blobs per batch delete request (the service maximum).
_DELETE_BATCH: Final = 256
_CONDITIONS: Final = "If-None-Match/If-Match"
# Keyword arguments that already configure the SDK's retries: when any is given, fsrdzv keeps its hands off.
_RETRY_KWARGS: Final = frozenset({"retry_policy", "retry_total", "initial_backoff", "increment_base", "backoff"})

_CODE_HINTS: Final[dict[str, tuple[int, str]]] = {
    "ContainerNotFound": (errno.ENOENT, "the container does not exist; create it, or fix the endpoint"),
    "AuthenticationFailed": (errno.EACCES, "authentication failed; check the account key, SAS token or credential"),
    "AuthorizationFailure": (errno.EACCES, "not authorised; check the credential's role on the container"),
    "AuthorizationPermissionMismatch": (
        errno.EACCES,
        "the credential lacks a permission; it needs read, write, delete and list on the container",
    ),
    "InvalidAuthenticationInfo": (errno.EACCES, "the credential is not valid for this account"),
    "AccountIsDisabled": (errno.EACCES, "the storage account is disabled"),
    "ServerBusy": (errno.EAGAIN, "the service is throttling requests; retry later"),
}


class _Answer(ExpectedAnswerError):
    """An expected non-2xx answer (412, 409 exists, 404 blob)."""

    @property
    def missing(self) -> bool:
        return self.status == 404 and self.code == "BlobNotFound"

    @property
    def lost(self) -> bool:
        """A condition did not hold: exists on create (409), stale (412), or the blob vanished (404 blob)."""
        return self.status == 412 or (self.status == 409 and self.code == "BlobAlreadyExists") or self.missing


def _error_code(exc: az_exc.HttpResponseError) -> str:
    code = getattr(exc, "error_code", None)  # set by the storage SDK's error deserialiser, not azure-core
    return str(getattr(code, "value", code) or "")


def _parse_container(bucket: str) -> tuple[str, str | None]:
    """``container@account.dfs.core.windows.net`` -> (container, blob account URL); plain names pass through."""
    container, at, host = bucket.partition("@")
    if not at:
        return bucket, None
    if not container or not host:
        raise ConfigurationError(f"cannot parse container@account from {bucket!r}")
    if "." not in host:
        host = f"{host}.blob.core.windows.net"
    # The dfs endpoint of an account serves the same blobs as its blob endpoint, which the Blob SDK speaks.
    return container, "https://" + host.replace(".dfs.", ".blob.", 1)


def _credential(options: dict[str, Any], account_name: str) -> Any:
    if options.get("credential") is not None:
        return options["credential"]
    if options.get("anon"):
        return None
    key = options.get("account_key") or os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
    if key:
        return {"account_name": account_name, "account_key": key}
    sas = options.get("sas_token") or os.environ.get("AZURE_STORAGE_SAS_TOKEN")
    if sas:
        return str(sas)
    tenant, client, client_secret = (options.get(k) for k in ("tenant_id", "client_id", "client_secret"))
    try:
        from azure import identity
    except ImportError:
        if tenant or client:
            raise ConfigurationError(
                "tenant_id/client_id/client_secret need azure-identity: pip install azure-identity"
            ) from None
        return None  # anonymous: public containers only
    if tenant and client and client_secret:
        return identity.ClientSecretCredential(tenant, client, client_secret)
    return identity.DefaultAzureCredential()


def _service_client(options: dict[str, Any], url_account: str | None, timeouts: tuple[float, float]) -> tuple[Any, str]:
    """A BlobServiceClient and the account URL it talks to, from options first, then the environment."""
    client_kwargs = dict(options.get("client_kwargs") or {})
    # fsrdzv's connect_timeout/read_timeout (or their defaults) unless client_kwargs names the SDK's own.
    client_kwargs.setdefault("connection_timeout", timeouts[0])
    client_kwargs.setdefault("read_timeout", timeouts[1])
    if not _RETRY_KWARGS & set(client_kwargs):
        # The SDK default backs off 15 s and more per attempt: 80 s before an unreachable endpoint is reported.
        # The rendezvous has its own retry policy, so the store fails fast and lets it decide.
        # (Fractions of a second work at run time; the annotation says int.)
        # A read that timed out is retried once: a silent endpoint fails within two read timeouts.
        client_kwargs["retry_policy"] = LinearRetry(
            backoff=0.5,  # type: ignore[arg-type]
            random_jitter_range=0.25,  # type: ignore[arg-type]
            retry_total=3,
            retry_read=1,
        )
    # A download's first request fetches at most this much: the size of an oversized blob is known before more.
    client_kwargs.setdefault("max_single_get_size", FIRST_GET_BYTES)
    connection_string = options.get("connection_string")
    account_name = options.get("account_name")
    account_url = options.get("account_url") or url_account
    if not connection_string and not account_name and not account_url:
        connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        account_name = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if connection_string:
        client = BlobServiceClient.from_connection_string(connection_string, **client_kwargs)
        return client, str(client.url).rstrip("/")
    if not account_url and account_name:
        host = options.get("account_host") or f"{account_name}.blob.core.windows.net"
        account_url = host if "://" in host else f"https://{host}"
    if not account_url:
        raise ConfigurationError(
            "no Azure storage account configured: give storage_options connection_string or account_name "
            "(with account_key, sas_token or a credential), or set AZURE_STORAGE_CONNECTION_STRING or "
            "AZURE_STORAGE_ACCOUNT_NAME"
        )
    if not account_name:
        account_name = account_url.split("://", 1)[-1].split(".", 1)[0]
    client = BlobServiceClient(account_url, credential=_credential(options, account_name), **client_kwargs)
    return client, account_url.rstrip("/")


class AzureStore(ObjectStore):
    """A run's document and records under ``az://container/prefix/<run_id>/``.

    :param rest: ``"container/prefix"`` or ``"container@account.dfs.core.windows.net/prefix"``.
    :param storage_options: see the module docstring; ``skip_selftest=True`` skips the conditional-write check.
    """

    service = "Azure"
    scheme = "az"
    conditions = _CONDITIONS
    known_options = _KNOWN_OPTIONS

    def _parse_bucket(self, bucket: str) -> str:
        container, self._url_account = _parse_container(bucket)
        return container

    def _connect(self, bucket: str, options: dict[str, Any]) -> str | None:
        self.container_name = bucket
        self.account_url = self._url_account or "the configured account"
        try:
            timeouts = (self.connect_timeout, self.read_timeout)
            self._service, self.account_url = _service_client(options, self._url_account, timeouts)
        except RendezvousError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"invalid Azure storage options for {self.location}: {one_line(exc)}") from None
        self._container = self._service.get_container_client(bucket)
        return self.account_url

    @property
    def where(self) -> str:
        return f"{self.location} (account {self.account_url})"

    def close(self) -> None:
        self._service.close()

    # -- the boundary ----------------------------------------------------------------------------------------

    def _translate(self, exc: Exception, what: str) -> Exception:
        log.debug("Azure request failed: %s at %s", what, self.where, exc_info=exc)
        prefix = f"Azure {what} at {self.where} failed"
        if isinstance(exc, az_exc.HttpResponseError) and exc.status_code:
            status, code = int(exc.status_code), _error_code(exc)
            answer = _Answer(status, code)
            if answer.lost or answer.not_modified:
                return answer
            # The message repeats request ids and the code on further lines; the first line says it all.
            reason = one_line(next(iter(str(exc.message or exc.reason or "").splitlines()), ""))
            number, hint = _CODE_HINTS.get(
                code,
                (errno.EACCES, "access denied; check the credentials")
                if status in (401, 403)
                else (errno.EIO, "check the account and the container"),
            )
            if code == "ContainerNotFound":
                hint = f"create container {self.container_name!r}, or fix the endpoint or account"
            return StorageError(number, f"{prefix}: {code or status}: {reason}; {hint}")
        if isinstance(exc, az_exc.ClientAuthenticationError):
            # No status: the credential itself failed (e.g. DefaultAzureCredential found nothing).
            return StorageError(
                errno.EACCES,
                f"{prefix}: {one_line(exc)}; give account_key, sas_token, connection_string or a credential",
            )
        if isinstance(exc, az_exc.ServiceRequestError):
            return StorageError(
                errno.ECONNREFUSED,
                f"{prefix}: cannot connect ({one_line(exc)}); check the connection string / account URL and the "
                "network",
            )
        if isinstance(exc, az_exc.ServiceResponseError):
            return StorageError(errno.ETIMEDOUT, f"{prefix}: no valid response ({one_line(exc)}); retry later")
        return StorageError(errno.EIO, f"{prefix}: {type(exc).__name__}: {one_line(exc)}; check the account")

    # -- raw requests (see ObjectStore) ----------------------------------------------------------------------

    def _sdk_get(self, key: str, limit: int, unless: str | None) -> tuple[bytes, str, int]:
        # One GET (of at most the client's first chunk): the downloader carries the blob's size and the ETag of
        # exactly the bytes it returns; an oversized blob is refused before the rest is fetched.
        condition: dict[str, Any] = {}
        if unless is not None:
            condition = {"etag": f'"{unless}"', "match_condition": MatchConditions.IfModified}
        downloader = self._container.get_blob_client(key).download_blob(**condition)
        size = int(downloader.size)
        data: bytes = b"" if size > limit else downloader.readall()
        return data, str(downloader.properties.etag).strip('"'), size

    def _sdk_head(self, key: str) -> str:
        # Get Blob Properties: a HEAD; the Content-MD5 in its headers where the blob has one, else the ETag.
        return _content_tag(self._container.get_blob_client(key).get_blob_properties())

    def _sdk_put(self, key: str, data: bytes, *, create: bool, match: str | None) -> str:
        kwargs: dict[str, Any] = {"overwrite": not create}
        if match is not None:
            kwargs.update(etag=f'"{match}"', match_condition=MatchConditions.IfNotModified)
        response = self._container.get_blob_client(key).upload_blob(data, **kwargs)
        return str(response["etag"]).strip('"')

    def _sdk_delete(self, key: str) -> None:
        self._container.get_blob_client(key).delete_blob()

    def _sdk_list(self, prefix: str, delimiter: str) -> tuple[dict[str, str], list[str]]:
        # The SDK follows continuation markers.
        if not delimiter:
            blobs = self._container.list_blobs(name_starts_with=prefix or None)
            return {b.name: _content_tag(b) for b in blobs}, []
        objects: dict[str, str] = {}
        prefixes: list[str] = []
        for item in self._container.walk_blobs(name_starts_with=prefix or None, delimiter=delimiter):
            if isinstance(item, BlobPrefix):
                prefixes.append(str(item.name))
            else:
                objects[item.name] = _content_tag(item)
        return objects, prefixes

    def _sdk_modified(self, prefix: str) -> list[float]:
        blobs = self._container.list_blobs(name_starts_with=prefix or None)
        return [b.last_modified.timestamp() for b in blobs if b.last_modified is not None]

    def _delete_many(self, keys: list[str]) -> None:
        for batch in batches(keys, _DELETE_BATCH):
            self._delete_batch(batch)

    def _delete_batch(self, names: list[str]) -> None:
        what = "batch delete of the run's blobs"
        try:
            responses = self._call(what, lambda: list(self._container.delete_blobs(*names, raise_on_any_failure=False)))
        except (StorageError, _Answer) as exc:
            # Some accounts and emulators refuse batch requests: fall back to one delete per blob.
            log.debug("batch delete refused at %s (%s); deleting one by one", self.where, exc)
            for name in names:
                self._delete(name, "delete of a run blob")
            return
        failed = [(n, r.status_code) for n, r in zip(names, responses, strict=False) if r.status_code not in (202, 404)]
        if failed:
            raise StorageError(
                errno.EIO,
                f"Azure {what} at {self.where} failed for {len(failed)} blob(s), e.g. {failed[0][0]} "
                f"(HTTP {failed[0][1]})",
            )

    def _exist(self, keys: list[str]) -> list[bool]:
        def exists(key: str) -> bool:
            return bool(self._call("check of a run's document", self._container.get_blob_client(key).exists))

        return in_threads(exists, keys)


def _content_tag(properties: BlobProperties) -> str:
    """A record's tag: its Content-MD5 (hex; ``StoreCapabilities.content_tags``), else its ETag."""
    md5 = properties.content_settings.content_md5
    return bytes(md5).hex() if md5 else str(properties.etag).strip('"')
