"""The object stores against real servers: moto (S3), Azurite (Azure Blob) and fake-gcs-server (GCS).

Every store runs the full conformance suite. The rest covers what only object stores have: the start-up self-test
refusing an endpoint that ignores conditions (injected by dropping the condition on the way to the SDK, the way a
proxy would), one-line errors for a missing bucket, an unreachable endpoint and bad credentials, the retry of
S3's 409 ConditionalRequestConflict (which no emulator produces, so it is injected), and configuration from the
environment in a fresh process, the way the CLI and torchrun children get it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest

import fsrdzv
from fsrdzv import StorageError, Store, UnsupportedStoreError, open_store
from fsrdzv._errors import ConfigurationError, RendezvousConnectionError
from fsrdzv._stores import _selftest
from fsrdzv._stores._azure import AzureStore, _parse_container
from fsrdzv._stores._gcs import GcsStore
from fsrdzv._stores._s3 import CONFLICT_ATTEMPTS, S3Store
from fsrdzv.testing import StoreConformance, StoreSpec
from tests.servers import Endpoint, Server, free_port

# -- conformance ---------------------------------------------------------------------------------------------


class _ObjectConformance(StoreConformance):
    # Emulators on 2 cores: fewer increments than the local stores, still real contention between processes.
    processes = 4
    increments = 10


class TestS3Store(_ObjectConformance):
    @pytest.fixture
    def spec(self, s3_endpoint: Endpoint) -> StoreSpec:
        spec: StoreSpec = s3_endpoint.spec()
        return spec


class TestAzureStore(_ObjectConformance):
    @pytest.fixture
    def spec(self, azure_endpoint: Endpoint) -> StoreSpec:
        spec: StoreSpec = azure_endpoint.spec()
        return spec


class TestGcsStore(_ObjectConformance):
    @pytest.fixture
    def spec(self, gcs_endpoint: Endpoint) -> StoreSpec:
        spec: StoreSpec = gcs_endpoint.spec()
        return spec


def _open(endpoint: Endpoint, run_id: str = "run", **extra: Any) -> Store:
    return open_store(endpoint.url, run_id, storage_options={**endpoint.storage_options, **extra})


def _assert_one_line(exc: BaseException, *needles: str) -> None:
    text = str(exc)
    assert "\n" not in text, text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)
    # Translated at the boundary: no botocore/azure/google exception is chained for a traceback to show.
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


# -- self-test -----------------------------------------------------------------------------------------------


def _lie_s3(monkeypatch: pytest.MonkeyPatch, drop: set[str]) -> None:
    import s3fs

    original = s3fs.S3FileSystem._call_s3

    async def lying(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        for name in drop:
            kwargs.pop(name, None)
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", lying)


def _lie_azure(monkeypatch: pytest.MonkeyPatch, drop: set[str]) -> None:
    from azure.storage.blob import BlobClient

    original = BlobClient.upload_blob

    def lying(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        if "IfNoneMatch" in drop:
            kwargs["overwrite"] = True
        if "IfMatch" in drop:
            kwargs.pop("etag", None)
            kwargs.pop("match_condition", None)
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(BlobClient, "upload_blob", lying)


def _lie_gcs(monkeypatch: pytest.MonkeyPatch, drop: set[str]) -> None:
    from google.cloud.storage._http import Connection

    original = Connection.api_request

    def lying(self: Any, *args: Any, **kwargs: Any) -> Any:
        query = dict(kwargs.get("query_params") or {})
        generation = query.get("ifGenerationMatch")
        if (generation == 0 and "IfNoneMatch" in drop) or (generation and "IfMatch" in drop):
            del query["ifGenerationMatch"]
            kwargs["query_params"] = query
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "api_request", lying)


_LIARS = {"s3": _lie_s3, "azure": _lie_azure, "gcs": _lie_gcs}
_SERVER_FIXTURES = {"s3": "moto_server", "azure": "azurite_server", "gcs": "fake_gcs_server"}


@pytest.mark.parametrize(
    ("drop", "symptom"),
    [
        ({"IfNoneMatch", "IfMatch"}, "a second create-if-absent of the same object succeeded"),
        ({"IfMatch"}, "an update carrying a stale version succeeded"),
    ],
    ids=["ignores-all", "ignores-if-match"],
)
@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_selftest_refuses_store_that_ignores_conditions(
    kind: str, drop: set[str], symptom: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint: Endpoint = request.getfixturevalue(f"{kind}_endpoint")
    _LIARS[kind](monkeypatch, drop)
    with pytest.raises(UnsupportedStoreError) as info:
        _open(endpoint)
    _assert_one_line(info.value, "ignores conditional writes", symptom, endpoint.url, "use a store that honours them")
    # An UnsupportedStoreError is a configuration problem: retrying the same endpoint will not help.
    assert isinstance(info.value, ConfigurationError)
    # Nothing is cached for a refused endpoint, and the probe was cleaned up.
    monkeypatch.undo()
    store = _open(endpoint, skip_selftest=True)
    assert store.list_records("hb") == {}
    assert fsrdzv.list_runs(endpoint.url, storage_options=endpoint.storage_options) == []


def test_selftest_refuses_store_that_refuses_valid_updates(
    s3_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that rewrites ETags: every If-Match fails, so no CAS could ever win and the job would hang.
    import s3fs

    original = s3fs.S3FileSystem._call_s3

    async def mangling(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if "IfMatch" in kwargs:
            kwargs["IfMatch"] = '"0123456789abcdef0123456789abcdef"'
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", mangling)
    with pytest.raises(UnsupportedStoreError) as info:
        _open(s3_endpoint)
    _assert_one_line(info.value, "mishandles conditional writes", "current version was refused", s3_endpoint.url)


def test_selftest_can_be_skipped(s3_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    _lie_s3(monkeypatch, {"IfNoneMatch", "IfMatch"})
    store = _open(s3_endpoint, skip_selftest=True)  # the caller vouches for the endpoint
    assert store.compare_and_set(b"x").won


def test_selftest_runs_once_per_endpoint_and_leaves_nothing(
    object_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    original = _selftest.verify_conditional_writes

    def counting(store: Any, **kwargs: Any) -> None:
        calls.append(kwargs["location"])
        original(store, **kwargs)

    created: list[str] = []
    for cls in (S3Store, AzureStore, GcsStore):
        probe = cls.probe_create

        def spy(self: Any, key: str, data: bytes, _probe: Any = probe) -> str | None:
            created.append(key)
            result: str | None = _probe(self, key, data)
            return result

        monkeypatch.setattr(cls, "probe_create", spy)
    monkeypatch.setattr("fsrdzv._stores._object.verify_conditional_writes", counting)
    a = _open(object_endpoint, "run-a")
    _open(object_endpoint, "run-b")
    assert len(calls) == 2
    assert len(set(created)) == 1 and len(created) == 2  # one probe key, created twice (the second refused)
    assert created[0].startswith(object_endpoint.url.split("/", 3)[3] + "/.fsrdzv-probe/")
    # The probe is gone, and it never counts as a run.
    a.compare_and_set(b"x")
    assert fsrdzv.list_runs(object_endpoint.url, storage_options=object_endpoint.storage_options) == ["run-a"]
    assert a._get(created[0], "check", "the probe", 1024) is None  # type: ignore[attr-defined]


def test_selftest_cache_is_per_endpoint(s3_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    _open(s3_endpoint)
    # The same endpoint opens without requests even once it starts lying (the verdict is cached)...
    _lie_s3(monkeypatch, {"IfNoneMatch", "IfMatch"})
    _open(s3_endpoint, "other-run")
    # ...but another prefix is checked again, and clearing the cache re-runs the check.
    with pytest.raises(UnsupportedStoreError):
        open_store(s3_endpoint.url + "-elsewhere", "run", storage_options=s3_endpoint.storage_options)
    _selftest.clear_selftest_cache()
    with pytest.raises(UnsupportedStoreError):
        _open(s3_endpoint)


# -- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_missing_bucket_is_one_line_naming_the_endpoint(kind: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(_SERVER_FIXTURES[kind])
    endpoint = server.endpoint()
    url = endpoint.url.replace(server.bucket, "no-such-bucket-" + uuid.uuid4().hex[:6])
    with pytest.raises(StorageError) as info:
        open_store(url, "run", storage_options=endpoint.storage_options)
    assert isinstance(info.value, RendezvousConnectionError)
    assert info.value.errno == errno.ENOENT
    _assert_one_line(info.value, url, server.url, "create ")
    # Skipping the self-test moves the same error to the first write.
    store = open_store(url, "run", storage_options={**endpoint.storage_options, "skip_selftest": True})
    with pytest.raises(StorageError) as info:
        store.compare_and_set(b"x")
    _assert_one_line(info.value, url, "create ")


def _unreachable(kind: str, endpoint: Endpoint, server: Server) -> dict[str, Any]:
    dead = f"127.0.0.1:{free_port()}"
    options = dict(endpoint.storage_options)
    if kind == "azure":
        options["connection_string"] = options["connection_string"].replace(server.url.split("//")[1], dead)
    else:
        options["endpoint_url"] = f"http://{dead}"
    # The default retry budgets (about 3 s on S3, 10 s on GCS) suit users; the test checks the message only.
    if kind == "gcs":
        options["retry_timeout"] = 1.0
    if kind == "s3":
        options["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": 1}}
    return options


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_unreachable_endpoint_is_one_line_naming_it(kind: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(_SERVER_FIXTURES[kind])
    endpoint = server.endpoint()
    options = _unreachable(kind, endpoint, server)
    with pytest.raises(StorageError) as info:
        open_store(endpoint.url, "run", storage_options=options)
    assert isinstance(info.value, ConnectionError)
    assert info.value.errno == errno.ECONNREFUSED
    dead = options.get("endpoint_url") or options["connection_string"].split("BlobEndpoint=")[1]
    _assert_one_line(info.value, endpoint.url, dead.split("//")[1].split("/")[0], "cannot connect")


def test_azure_bad_key_is_permission_error(azure_endpoint: Endpoint) -> None:
    wrong = azure_endpoint.storage_options["connection_string"].replace("AccountKey=Eby8", "AccountKey=AAAA")
    with pytest.raises(StorageError) as info:
        open_store(azure_endpoint.url, "run", storage_options={"connection_string": wrong})
    assert info.value.errno == errno.EACCES
    _assert_one_line(info.value, azure_endpoint.url, "credential")


def test_s3_without_credentials_says_how_to_give_them(s3_endpoint: Endpoint, tmp_path: Any) -> None:
    # In a child process: botocore caches credential lookups and reads the environment once.
    options = {"endpoint_url": s3_endpoint.env["AWS_ENDPOINT_URL"]}
    code = f"""
        import fsrdzv
        try:
            fsrdzv.open_store({s3_endpoint.url!r}, "run", storage_options={options!r})
        except fsrdzv.StorageError as exc:
            print("ERR", exc.errno, exc)
        """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    out = _run_child(code, env)
    assert out.startswith(f"ERR {errno.EACCES} "), out
    assert "AWS_ACCESS_KEY_ID" in out and s3_endpoint.url in out


def test_gcs_without_credentials_says_how_to_give_them(
    gcs_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    options = {k: v for k, v in gcs_endpoint.storage_options.items() if k != "token"}
    with pytest.raises(StorageError) as info:
        open_store(gcs_endpoint.url, "run", storage_options=options)
    assert info.value.errno == errno.EACCES
    _assert_one_line(info.value, gcs_endpoint.url, "token='anon'")


@pytest.mark.parametrize("kind", ["azure", "gcs"])
def test_unknown_storage_option_is_refused(kind: str, request: pytest.FixtureRequest) -> None:
    endpoint: Endpoint = request.getfixturevalue(f"{kind}_endpoint")
    with pytest.raises(ConfigurationError, match="unknown storage option"):
        _open(endpoint, no_such_option=1)


def test_record_kind_must_be_an_identifier(object_endpoint: Endpoint) -> None:
    store = _open(object_endpoint)
    with pytest.raises(ConfigurationError, match="identifier"):
        store.put_record("../x", "n", b"1")


def test_abfs_account_in_url() -> None:
    assert _parse_container("data") == ("data", None)
    assert _parse_container("data@acct.dfs.core.windows.net") == ("data", "https://acct.blob.core.windows.net")
    assert _parse_container("data@acct") == ("data", "https://acct.blob.core.windows.net")


# -- S3 409 ConditionalRequestConflict -----------------------------------------------------------------------


def _conflict_409() -> Exception:
    """The exception s3fs raises for a 409 answer: its own OSError(EBUSY), caused by botocore's ClientError."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError(
        {
            "Error": {"Code": "ConditionalRequestConflict", "Message": "A conflicting operation is in progress"},
            "ResponseMetadata": {"HTTPStatusCode": 409},
        },
        "PutObject",
    )
    translated: Exception = translate_boto_error(error)
    return translated


def _inject_conflicts(store: S3Store, count: int) -> list[float]:
    """Make the next ``count`` PutObject calls of ``store`` answer 409; return the list of backoff sleeps."""
    original = store._send
    remaining = [count]

    async def faulty(method: str, **kwargs: Any) -> Any:
        if method == "put_object" and remaining[0] > 0:
            remaining[0] -= 1
            raise _conflict_409()
        return await original(method, **kwargs)

    sleeps: list[float] = []
    store._send = faulty  # type: ignore[method-assign]
    store._sleep = sleeps.append
    return sleeps


def test_s3_409_conflict_is_retried(s3_endpoint: Endpoint) -> None:
    store = _open(s3_endpoint)
    assert isinstance(store, S3Store)
    first = store.compare_and_set(b"1").snapshot
    assert first is not None
    sleeps = _inject_conflicts(store, 1)
    result = store.compare_and_set(b"2", first.token)
    assert result.won
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 1.0
    assert store.read() == result.snapshot


def test_s3_persistent_409_is_a_lost_race(s3_endpoint: Endpoint) -> None:
    store = _open(s3_endpoint)
    assert isinstance(store, S3Store)
    first = store.compare_and_set(b"1").snapshot
    assert first is not None
    sleeps = _inject_conflicts(store, CONFLICT_ATTEMPTS)
    result = store.compare_and_set(b"2", first.token)
    assert not result.won
    assert result.snapshot == first  # nothing was written; the current document comes back
    assert len(sleeps) == CONFLICT_ATTEMPTS - 1
    # Backoff grows (full jitter under an exponential cap) rather than hammering the key.
    assert all(0 <= s <= min(1.0, 0.05 * 2**i) for i, s in enumerate(sleeps))


# -- configuration from the environment ------------------------------------------------------------------------


def _run_child(code: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


_CHILD_CAS = """
    import fsrdzv
    store = fsrdzv.open_store({url!r}, "env-run")
    first = store.compare_and_set(b"from-env").snapshot
    assert not store.compare_and_set(b"again").won
    print("OK", store.compare_and_set(b"next", first.token).won, fsrdzv.list_runs({url!r}))
    """


def _clean_env() -> dict[str, str]:
    drop = ("AWS_", "FSSPEC_", "AZURE_", "STORAGE_EMULATOR_HOST", "GOOGLE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.mark.parametrize("style", ["aws", "fsspec"])
def test_s3_configured_from_environment(s3_endpoint: Endpoint, style: str) -> None:
    env = _clean_env()
    if style == "aws":
        env.update(s3_endpoint.env)  # AWS_ENDPOINT_URL + AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_DEFAULT_REGION
    else:
        env.update(
            FSSPEC_S3_ENDPOINT_URL=s3_endpoint.env["AWS_ENDPOINT_URL"],
            FSSPEC_S3_KEY="testing",
            FSSPEC_S3_SECRET="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
    assert _run_child(_CHILD_CAS.format(url=s3_endpoint.url), env) == "OK True ['env-run']"


@pytest.mark.parametrize("kind", ["azure", "gcs"])
def test_configured_from_environment(kind: str, request: pytest.FixtureRequest) -> None:
    endpoint: Endpoint = request.getfixturevalue(f"{kind}_endpoint")
    env = _clean_env()
    env.update(endpoint.env)  # AZURE_STORAGE_CONNECTION_STRING / STORAGE_EMULATOR_HOST
    assert _run_child(_CHILD_CAS.format(url=endpoint.url), env) == "OK True ['env-run']"


# -- layout and housekeeping -----------------------------------------------------------------------------------


def test_keys_follow_the_documented_layout(s3_endpoint: Endpoint, moto_server: Server) -> None:
    store = _open(s3_endpoint, "layout")
    store.compare_and_set(b"x")
    store.put_record("hb", "node/1", b"1")
    prefix = s3_endpoint.url.split("/", 3)[3]
    listing = moto_server.client().list_objects_v2(Bucket=moto_server.bucket, Prefix=prefix)  # type: ignore[attr-defined]
    keys = sorted(o["Key"] for o in listing["Contents"])
    assert keys == [f"{prefix}/layout/records/hb/node%2F1", f"{prefix}/layout/state"]


def test_empty_prefix(object_endpoint: Endpoint) -> None:
    bucket_only = "/".join(object_endpoint.url.split("/")[:3])
    run = "root-" + uuid.uuid4().hex[:8]
    store = open_store(bucket_only, run, storage_options=object_endpoint.storage_options)
    assert store.compare_and_set(b"x").won
    assert run in fsrdzv.list_runs(bucket_only, storage_options=object_endpoint.storage_options)
    store.delete_run()
    assert run not in fsrdzv.list_runs(bucket_only, storage_options=object_endpoint.storage_options)


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_delete_run_in_batches(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint: Endpoint = request.getfixturevalue(f"{kind}_endpoint")
    monkeypatch.setattr(f"fsrdzv._stores.{'_s3' if kind == 's3' else '_azure'}._DELETE_BATCH", 2)
    store = _open(endpoint)
    store.compare_and_set(b"x")
    for i in range(5):
        store.put_record("hb", f"n{i}", b"1")
    store.delete_run()
    assert store.read() is None and store.list_records("hb") == {}


def test_list_runs_needs_a_document(object_endpoint: Endpoint) -> None:
    with_doc = _open(object_endpoint, "with-doc")
    with_doc.compare_and_set(b"x")
    _open(object_endpoint, "records-only").put_record("hb", "n", b"1")
    assert fsrdzv.list_runs(object_endpoint.url, storage_options=object_endpoint.storage_options) == ["with-doc"]
