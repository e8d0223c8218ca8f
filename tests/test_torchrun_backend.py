"""fsrdzv.torchrun without launching torchrun: the backend contract, --rdzv-conf parsing, error mapping, the
per-round TCPStore, the graceful exit of spares, and the registry entry point.

The backend tests are our own port of the eight checks of torch's ``RendezvousBackendTestMixin`` (reference
§12.2), run against a directory and against S3 (moto).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import fsrdzv.testing

pytest.importorskip("torch")

from torch.distributed import HashStore, TCPStore  # type: ignore[attr-defined]  # torch does not re-export them
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

import fsrdzv
from fsrdzv import torchrun
from fsrdzv.torchrun import (
    FsRendezvousBackend,
    FsRendezvousHandler,
    GracefulExit,
    handler_creator,
    parse_config,
)
from tests.servers import Endpoint

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_environment() -> Any:
    """Each round's handler writes FSRDZV_* for the workers into this process's environment (torch's agent copies
    it into every worker): give every test the environment it started with."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ---------------------------------------------------------------------------------------------------------------
# Storage back ends for the contract tests.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["dir", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> FsRendezvousBackend:
    run_id = "run-" + uuid.uuid4().hex[:8]
    if request.param == "dir":
        return FsRendezvousBackend(str(tmp_path / "rdzv"), run_id)
    s3: Endpoint = request.getfixturevalue("s3_endpoint")  # moto, from conftest.py
    return FsRendezvousBackend(s3.url, run_id, s3.storage_options)


def _corrupt(backend: FsRendezvousBackend) -> None:
    """Write bytes that are not an fsrdzv document where the document lives, bypassing fsrdzv."""
    store: Any = backend.store
    fsrdzv.testing.corrupt(store, b"this is not an fsrdzv document")


# ---------------------------------------------------------------------------------------------------------------
# The backend contract (torch's RendezvousBackendTestMixin, §12.2, written anew).
# ---------------------------------------------------------------------------------------------------------------


class TestBackendContract:
    def test_name_is_the_entry_point_name(self, backend: FsRendezvousBackend) -> None:
        assert backend.name == "fsrdzv"

    def test_get_state_returns_backend_state(self, backend: FsRendezvousBackend) -> None:
        backend.set_state(b"x")
        got = backend.get_state()
        assert got is not None
        state, token = got
        assert state == b"x"
        assert token is not None

    def test_get_state_returns_none_if_backend_state_does_not_exist(self, backend: FsRendezvousBackend) -> None:
        assert backend.get_state() is None

    def test_get_state_raises_error_if_backend_state_is_corrupt(self, backend: FsRendezvousBackend) -> None:
        backend.set_state(b"x")
        _corrupt(backend)
        with pytest.raises(RendezvousStateError):
            backend.get_state()

    def test_set_state_sets_backend_state_if_it_does_not_exist(self, backend: FsRendezvousBackend) -> None:
        result = backend.set_state(b"x")
        assert result is not None
        state, token, has_set = result
        assert (state, has_set) == (b"x", True)
        assert token is not None

    def test_set_state_sets_backend_state_if_token_is_current(self, backend: FsRendezvousBackend) -> None:
        first = backend.set_state(b"x")
        assert first is not None
        result = backend.set_state(b"y", first[1])
        assert result is not None
        state, token, has_set = result
        assert (state, has_set) == (b"y", True)
        assert token != first[1]
        assert backend.get_state() == (b"y", token)

    def test_set_state_returns_current_backend_state_if_token_is_old(self, backend: FsRendezvousBackend) -> None:
        first = backend.set_state(b"x")
        assert first is not None
        second = backend.set_state(b"y", first[1])
        assert second is not None
        result = backend.set_state(b"z", first[1])
        assert result == (b"y", second[1], False)
        assert backend.get_state() == (b"y", second[1])

    def test_set_state_returns_current_backend_state_if_token_is_none(self, backend: FsRendezvousBackend) -> None:
        first = backend.set_state(b"x")
        assert first is not None
        assert backend.set_state(b"y") == (b"x", first[1], False)

    @pytest.mark.parametrize("token", ["invalid", b"1:abc", 7, object(), "999:nope"])
    def test_set_state_returns_current_backend_state_if_token_is_invalid(
        self, backend: FsRendezvousBackend, token: object
    ) -> None:
        first = backend.set_state(b"x")
        assert first is not None
        assert backend.set_state(b"y", token) == (b"x", first[1], False)
        assert backend.get_state() == (b"x", first[1])

    def test_set_state_with_a_token_on_an_empty_backend_cannot_tell(self, backend: FsRendezvousBackend) -> None:
        # torch's "the backend cannot tell" row: the holder keeps its copy and retries create-only.
        assert backend.set_state(b"x", "1:whatever") is None
        assert backend.get_state() is None


def test_storage_failure_becomes_torch_connection_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the endpoint directory should be")
    backend = FsRendezvousBackend(str(blocker / "rdzv"), "run")
    with pytest.raises(RendezvousConnectionError) as info:
        backend.set_state(b"x")
    assert isinstance(info.value.__cause__, fsrdzv.StorageError)


def test_tampered_document_is_a_state_error(tmp_path: Path) -> None:
    endpoint = str(tmp_path / "rdzv")
    FsRendezvousBackend(endpoint, "run").set_state(b"unsigned")
    signed = FsRendezvousBackend(endpoint, "run", secret=b"0123456789abcdef0123")
    with pytest.raises(RendezvousStateError):
        signed.get_state()


def test_torch_dynamic_handler_runs_on_the_backend(tmp_path: Path) -> None:
    """torch's own DynamicRendezvousHandler forms a 2-node round through FsRendezvousBackend."""
    endpoint, run_id = str(tmp_path / "rdzv"), "torch-own"
    store = HashStore()
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def node(i: int) -> None:
        try:
            handler = DynamicRendezvousHandler.from_backend(
                run_id,
                store,
                FsRendezvousBackend(endpoint, run_id),
                min_nodes=2,
                max_nodes=2,
                local_addr=f"127.0.0.{i + 1}",
                keep_alive_interval=1,
            )
            info = handler.next_rendezvous()
            results[i] = (info.rank, info.world_size, handler)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted((r[0], r[1]) for r in results.values()) == [(0, 2), (1, 2)]
    assert results[0][2].get_backend() == "fsrdzv"
    for _, _, handler in results.values():
        handler.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# --rdzv-conf parsing.
# ---------------------------------------------------------------------------------------------------------------


def _params(endpoint: str = "/shared/rdzv", min_nodes: int = 1, max_nodes: int = 2, **conf: Any) -> Any:
    return RendezvousParameters("fsrdzv", endpoint, "run1", min_nodes, max_nodes, "10.0.0.1", **conf)


class TestConfig:
    def test_defaults_are_torchs(self) -> None:
        config = parse_config(_params())
        assert (config.join_timeout, config.last_call_timeout, config.close_timeout) == (600, 30, 30)
        assert (config.heartbeat_timeout, config.keep_alive_interval, config.keep_alive_max_attempt) == (5, 5, 3)
        assert (config.endpoint, config.run_id, config.min_nodes, config.max_nodes) == ("/shared/rdzv", "run1", 1, 2)
        assert config.local_addr == "10.0.0.1"
        assert config.store_timeout == 60
        assert config.storage_options == {}

    def test_torch_strings_are_parsed_like_get_as_int(self) -> None:
        config = parse_config(
            _params(
                join_timeout=" 900 ",
                last_call_timeout="10",
                close_timeout="7",
                heartbeat_timeout="4",
                keep_alive_interval="2",
                keep_alive_max_attempt=" 5",
            )
        )
        assert (config.join_timeout, config.last_call_timeout, config.close_timeout) == (900, 10, 7)
        assert (config.heartbeat_timeout, config.keep_alive_interval, config.keep_alive_max_attempt) == (4, 2, 5)

    def test_fractions_numbers_and_timedeltas_are_accepted(self) -> None:
        config = parse_config(
            _params(last_call_timeout="0.5", keep_alive_interval=1.5, join_timeout=datetime.timedelta(minutes=2))
        )
        assert (config.last_call_timeout, config.keep_alive_interval, config.join_timeout) == (0.5, 1.5, 120)

    def test_the_timeout_torchrun_injects_is_ignored(self) -> None:
        assert parse_config(_params(timeout="900")) == parse_config(_params())

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("join_timeout", "abc"),
            ("join_timeout", "0"),
            ("last_call_timeout", "-1"),
            ("close_timeout", "nan"),
            ("heartbeat_timeout", "inf"),
            ("keep_alive_interval", "0"),  # torch accepts 0 and then spins (§13.5)
            ("keep_alive_interval", True),
            ("keep_alive_max_attempt", "0"),
            ("keep_alive_max_attempt", "2.5"),
            ("keep_alive_max_attempt", "x"),
            ("read_timeout", "soon"),
        ],
    )
    def test_malformed_values_name_key_and_value(self, key: str, value: object) -> None:
        conf: dict[str, Any] = {key: value}
        with pytest.raises(ValueError, match=f"{key}={value!r}") as info:
            parse_config(_params(**conf))
        assert isinstance(info.value, fsrdzv.ConfigurationError)
        assert "\n" not in str(info.value)

    def test_unknown_key_is_refused_with_a_suggestion(self) -> None:
        # torch documents "heartbeat" but reads "heartbeat_timeout" (§13.3); fsrdzv says so instead of ignoring it.
        with pytest.raises(ValueError, match=r"unknown --rdzv-conf key 'heartbeat' \(value '9'\).*heartbeat_timeout"):
            parse_config(_params(heartbeat="9"))

    def test_c10d_only_keys_are_refused(self) -> None:
        with pytest.raises(ValueError, match="store_type"):
            parse_config(_params(store_type="file"))

    def test_directory_storage_options(self) -> None:
        config = parse_config(_params(lock="false", lock_timeout="2.5", fsync="yes", permissions="group"))
        assert config.storage_options == {"lock": False, "lock_timeout": 2.5, "fsync": True, "permissions": "group"}

    def test_s3_storage_options(self) -> None:
        config = parse_config(
            _params("s3://bucket/rdzv", endpoint_url="http://minio:9000", region="eu-west-1", anon="0")
        )
        assert config.storage_options == {
            "endpoint_url": "http://minio:9000",
            "client_kwargs": {"region_name": "eu-west-1"},
            "anon": False,
        }

    def test_gcs_and_azure_storage_options(self) -> None:
        config = parse_config(_params("gs://bucket/rdzv", endpoint_url="http://gcs:4443", project="p", token="anon"))
        assert config.storage_options == {"endpoint_url": "http://gcs:4443", "project": "p", "token": "anon"}
        config = parse_config(_params("az://container/rdzv", endpoint_url="http://azurite:10000/acct"))
        assert config.storage_options == {"account_url": "http://azurite:10000/acct"}

    def test_credentials_are_not_taken_from_the_command_line(self) -> None:
        # torchrun logs every --rdzv-conf value; credentials come from the environment instead.
        with pytest.raises(ValueError, match="unknown --rdzv-conf key 'secret'"):
            parse_config(_params("s3://bucket/rdzv", secret="hunter2"))

    def test_storage_options_of_another_store_are_refused(self) -> None:
        with pytest.raises(ValueError, match=r"'endpoint_url'.*file:// endpoint"):
            parse_config(_params(endpoint_url="http://minio:9000"))
        with pytest.raises(ValueError, match=r"lock='maybe'"):
            parse_config(_params(lock="maybe"))

    def test_secret_file(self, tmp_path: Path) -> None:
        path = tmp_path / "secret"
        path.write_text("s3cr3t-s3cr3t-s3cr3t\n")
        assert parse_config(_params(secret_file=str(path))).secret == b"s3cr3t-s3cr3t-s3cr3t"
        with pytest.raises(ValueError, match="secret_file="):
            parse_config(_params(secret_file=str(tmp_path / "missing")))
        assert "s3cr3t" not in repr(parse_config(_params(secret_file=str(path))))

    def test_invalid_endpoint_and_run_id_fail_at_creation(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="endpoint"):
            torchrun.create_handler(_params(""))
        with pytest.raises(ValueError, match="run id"):
            torchrun.create_handler(RendezvousParameters("fsrdzv", str(tmp_path), "a/b", 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# The registry and the import boundary.
# ---------------------------------------------------------------------------------------------------------------


def test_entry_point_registers_fsrdzv(tmp_path: Path) -> None:
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    handler = get_rendezvous_handler(
        RendezvousParameters("fsrdzv", str(tmp_path), "reg", 1, 1, "127.0.0.1", timeout="900")
    )
    assert isinstance(handler, FsRendezvousHandler)
    assert handler.get_backend() == "fsrdzv"
    assert handler.get_run_id() == "reg"
    assert handler.use_agent_store is True
    assert callable(handler_creator())


def test_import_fsrdzv_does_not_import_torch() -> None:
    code = "import sys, fsrdzv, fsrdzv.testing; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------------------------
# The torch-facing handler with a scripted core.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Info:
    round: int
    rank: int
    world_size: int
    master_addr: str
    master_port: int


class FakeCore:
    """Plays fsrdzv's core handler: returns or raises what the test queued."""

    def __init__(self, *results: Any) -> None:
        self.results = list(results)
        self.run_id = "fake"
        self.waiting: Any = 0
        self.shutdown_result: Any = True
        self.closed = False

    def next_rendezvous(self) -> Any:
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result

    def num_nodes_waiting(self) -> int:
        if isinstance(self.waiting, BaseException):
            raise self.waiting
        return int(self.waiting)

    def is_closed(self) -> bool:
        return self.closed

    def set_closed(self) -> None:
        self.closed = True

    def shutdown(self) -> bool:
        if isinstance(self.shutdown_result, BaseException):
            raise self.shutdown_result
        return bool(self.shutdown_result)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(port: int, timeout: float = 2.0) -> TCPStore:
    return TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout))


class TestHandler:
    @pytest.mark.parametrize(
        ("ours", "theirs"),
        [
            (fsrdzv.RendezvousClosedError("closed"), RendezvousClosedError),
            (fsrdzv.RendezvousTimeoutError("late"), RendezvousTimeoutError),
            (fsrdzv.RendezvousConnectionError("down"), RendezvousConnectionError),
            (fsrdzv.StorageError("disk full"), RendezvousConnectionError),
            (fsrdzv.StateCorruptError("garbage"), RendezvousStateError),
            (fsrdzv.SchemaVersionError("newer"), RendezvousStateError),
            (fsrdzv.TamperedError("bad hmac"), RendezvousStateError),
            (fsrdzv.RendezvousError("other"), RendezvousError),
        ],
    )
    def test_errors_are_mapped_to_torchs(self, ours: Exception, theirs: type[Exception]) -> None:
        handler = FsRendezvousHandler(FakeCore(ours))
        with pytest.raises(theirs, match=str(ours)) as info:
            handler.next_rendezvous()
        assert type(info.value) is theirs
        assert info.value.__cause__ is ours

    def test_spare_exits_with_status_0_under_torchrun(self) -> None:
        exc = fsrdzv.RendezvousGracefulExitError("closed while spare")
        handler = FsRendezvousHandler(FakeCore(exc), graceful_exit="exit")
        with pytest.raises(GracefulExit) as info:
            handler.next_rendezvous()
        assert isinstance(info.value, SystemExit)
        assert info.value.code == 0
        assert "closed while spare" in str(info.value)

    def test_spare_raises_torchs_graceful_exit_when_asked(self) -> None:
        exc = fsrdzv.RendezvousGracefulExitError("closed while spare")
        handler = FsRendezvousHandler(FakeCore(exc), graceful_exit="raise")
        with pytest.raises(RendezvousGracefulExitError):
            handler.next_rendezvous()

    def test_entry_point_handlers_exit_gracefully(self, tmp_path: Path) -> None:
        handler = torchrun.create_handler(_params(str(tmp_path)))
        assert handler._graceful_exit == "exit"

    def test_rank_0_hosts_a_fresh_store_every_round(self) -> None:
        p0, p1 = _port(), _port()
        core = FakeCore(Info(0, 0, 2, "127.0.0.1", p0), Info(1, 0, 2, "127.0.0.1", p1))
        handler = FsRendezvousHandler(core, store_timeout=5)

        first = handler.next_rendezvous()
        assert (first.rank, first.world_size) == (0, 2)
        assert first.bootstrap_store_info is not None
        assert (first.bootstrap_store_info.master_addr, first.bootstrap_store_info.master_port) == ("127.0.0.1", p0)
        first.store.set("role_info/0", "a")
        # The agent's keys live under the round's prefix of the server that the workers reach as MASTER_ADDR:PORT.
        assert _client(p0).get("torch.rendezvous.fake.0/role_info/0") == b"a"

        second = handler.next_rendezvous()
        assert second.bootstrap_store_info is not None
        assert second.bootstrap_store_info.master_port == p1
        # A fresh key space: nothing of round 0 is visible in round 1.
        assert not second.store.check(["role_info/0"])
        second.store.set("role_info/0", "b")
        assert _client(p1).get("torch.rendezvous.fake.1/role_info/0") == b"b"
        # The previous round's server no longer accepts connections.
        with pytest.raises(RuntimeError):
            _client(p0, timeout=1)
        handler.shutdown()
        with pytest.raises(RuntimeError):
            _client(p1, timeout=1)

    def test_other_ranks_connect_to_rank_0s_store(self) -> None:
        port = _port()
        rank0 = FsRendezvousHandler(FakeCore(Info(3, 0, 2, "127.0.0.1", port)), store_timeout=5)
        rank1 = FsRendezvousHandler(FakeCore(Info(3, 1, 2, "127.0.0.1", port)), store_timeout=10)
        got: dict[str, Any] = {}
        # Rank 1 may come back from the rendezvous before rank 0's server is up: its client retries.
        t = threading.Thread(target=lambda: got.setdefault("info", rank1.next_rendezvous()))
        t.start()
        info0 = rank0.next_rendezvous()
        t.join(15)
        info1 = got["info"]
        info0.store.set("k", "v")
        assert info1.store.get("k") == b"v"
        assert info1.bootstrap_store_info == info0.bootstrap_store_info
        rank0.shutdown()
        rank1.shutdown()

    def test_unreachable_rank_0_is_a_connection_error(self) -> None:
        handler = FsRendezvousHandler(FakeCore(Info(0, 1, 2, "127.0.0.1", _port())), store_timeout=1)
        with pytest.raises(RendezvousConnectionError, match="rank 0's TCPStore"):
            handler.next_rendezvous()

    def test_port_taken_on_rank_0_is_a_connection_error(self) -> None:
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            handler = FsRendezvousHandler(FakeCore(Info(0, 0, 1, "127.0.0.1", port)), store_timeout=1)
            with pytest.raises(RendezvousConnectionError, match="starting the TCPStore server"):
                handler.next_rendezvous()

    def test_num_nodes_waiting_survives_storage_outages(self, caplog: pytest.LogCaptureFixture) -> None:
        core = FakeCore()
        handler = FsRendezvousHandler(core)
        core.waiting = 2
        assert handler.num_nodes_waiting() == 2
        core.waiting = fsrdzv.StorageError("503 slow down")
        assert handler.num_nodes_waiting() == 0
        assert handler.num_nodes_waiting() == 0
        assert sum("503 slow down" in r.getMessage() for r in caplog.records) == 1  # warned once, not per poll
        core.waiting = fsrdzv.StateCorruptError("garbage")
        with pytest.raises(RendezvousStateError):
            handler.num_nodes_waiting()

    def test_shutdown_reports_failure_as_false(self) -> None:
        core = FakeCore()
        handler = FsRendezvousHandler(core)
        assert handler.shutdown() is True
        core.shutdown_result = fsrdzv.RendezvousTimeoutError("could not close")
        assert handler.shutdown() is False
        core.shutdown_result = KeyError("a bug")
        with pytest.raises(KeyError):
            handler.shutdown()

    def test_closed_state_is_passed_through(self) -> None:
        core = FakeCore()
        handler = FsRendezvousHandler(core)
        assert handler.is_closed() is False
        handler.set_closed()
        assert handler.is_closed() is True


# ---------------------------------------------------------------------------------------------------------------
# The torch-facing handler on the real core, in threads.
# ---------------------------------------------------------------------------------------------------------------


def _form(endpoint: str, run_id: str, n: int, **conf: Any) -> list[Any]:
    conf = {"last_call_timeout": "1", "keep_alive_interval": "1", "timeout": "900", **conf}
    handlers = [
        torchrun.create_handler(RendezvousParameters("fsrdzv", endpoint, run_id, n, n, "127.0.0.1", **conf))
        for _ in range(n)
    ]
    infos: list[Any] = [None] * n
    errors: list[BaseException] = []

    def join(i: int) -> None:
        try:
            infos[i] = handlers[i].next_rendezvous()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return list(zip(handlers, infos, strict=True))


def test_real_core_round_shares_one_store(tmp_path: Path) -> None:
    nodes = _form(str(tmp_path / "rdzv"), "threads", 3)
    ranks = sorted(info.rank for _, info in nodes)
    assert ranks == [0, 1, 2]
    assert {info.world_size for _, info in nodes} == {3}
    assert (
        len({(info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port) for _, info in nodes}) == 1
    )
    # What the agent does with the store: every rank writes, rank 0 reads all, everyone waits on a counter.
    for _, info in nodes:
        info.store.set(f"torchelastic/role_info/{info.rank}", str(info.rank))
        info.store.add("counter", 1)
    any_info = nodes[0][1]
    assert any_info.store.multi_get([f"torchelastic/role_info/{r}" for r in range(3)]) == [b"0", b"1", b"2"]
    assert any_info.store.add("counter", 0) == 3
    assert all(h.shutdown() for h, _ in nodes)


def test_master_port_is_held_from_join_until_the_server_serves() -> None:
    """The offered master port cannot be taken by another process between the join and the round's server."""
    import socket as socket_module

    ports = torchrun.PortReservation()
    port = ports.reserve("127.0.0.1")
    with socket_module.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", port))
    listener = ports.take(port)
    assert listener is not None and listener.getsockname()[1] == port
    assert ports.take(port) is None  # handed over once
    listener.close()
    ports.release()


# ---------------------------------------------------------------------------------------------------------------
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE (issue 14 §4): torch's IntegrationTest checks, ported.
# ---------------------------------------------------------------------------------------------------------------


def test_use_agent_store_is_true_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    handler = torchrun.create_handler(RendezvousParameters("fsrdzv", str(tmp_path), "share", 1, 1, "127.0.0.1"))
    assert handler.use_agent_store is True
    handler.shutdown()


def test_use_agent_store_is_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler = torchrun.create_handler(RendezvousParameters("fsrdzv", str(tmp_path), "share", 1, 1, "127.0.0.1"))
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    assert handler.use_agent_store is False  # read on every access, as torch does
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")
    assert handler.use_agent_store is True
    handler.shutdown()


def test_sharing_off_publishes_a_free_port_per_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like torch's test_share_tcp_store_is_disabled: every member reads rank 0's address and port from the round's
    store, and that port is not the agent's own server (worker rank 0 binds it)."""
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    nodes = _form(str(tmp_path / "rdzv"), "unshared", 2)
    infos = [info for _, info in nodes]
    boot = {(i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port) for i in infos}
    assert len(boot) == 1
    addr, port = boot.pop()
    assert addr == "127.0.0.1"
    keys = [b"127.0.0.1", str(port).encode()]
    assert [infos[1].store.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")] == keys
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free: nobody (no agent server) listens on it
    assert all(h.shutdown() for h, _ in nodes)


WORKER_VARIABLES = ("FSRDZV_ENDPOINT", "FSRDZV_RUN_ID", "FSRDZV_NODE_ID", "FSRDZV_ROUND", "FSRDZV_SAFE_POINT_FILE")


def test_workers_get_the_runs_coordinates_for_safe_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The handler writes them into this process's environment (torch's agent copies it): undone at the end.
    for name in (*WORKER_VARIABLES, "FSRDZV_STORAGE_OPTIONS", "FSRDZV_SECRET_FILE"):
        monkeypatch.setenv(name, "")  # so that the undo removes what the handler sets
        monkeypatch.delenv(name)
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123\n")
    endpoint = str(tmp_path / "rdzv")
    nodes = _form(endpoint, "coords", 1, scale_up_at="safe_point", scale_up_max_delay="60", secret_file=str(secret))
    handler, _ = nodes[0]
    assert os.environ["FSRDZV_ENDPOINT"] == endpoint and os.environ["FSRDZV_RUN_ID"] == "coords"
    assert os.environ["FSRDZV_ROUND"] == "0" and os.environ["FSRDZV_NODE_ID"]
    assert os.environ["FSRDZV_SECRET_FILE"] == str(secret)
    assert os.path.isdir(os.path.dirname(os.environ["FSRDZV_SAFE_POINT_FILE"]))
    assert handler.shutdown()
    assert not os.path.exists(os.path.dirname(os.environ["FSRDZV_SAFE_POINT_FILE"])), "the flag goes at shutdown"


def test_the_environment_test_left_nothing_behind() -> None:
    assert not [name for name in (*WORKER_VARIABLES, "FSRDZV_SECRET_FILE") if name in os.environ]


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"scale_up_at": "sometimes"}, "invalid --rdzv-conf value scale_up_at='sometimes': expected any_time"),
        ({"scale_up_max_delay": "-5"}, "invalid --rdzv-conf value scale_up_max_delay='-5': expected a number"),
    ],
)
def test_bad_scale_up_values_are_one_line(conf: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_config(_params(**conf))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("loglevel", "shown"),
    [
        ("", ["progress line", "a warning"]),
        ("ERROR", []),
        ("DEBUG", ["progress line", "debug", "store info", "a warning"]),
    ],
    ids=["default", "loglevel-error", "loglevel-debug"],
)
def test_fsrdzv_log_lines_show_under_torchrun(loglevel: str, shown: list[str]) -> None:
    """torchrun configures only torch's loggers: the handler gives fsrdzv's a stderr handler (progress at INFO)."""
    code = (
        "import logging\n"
        "from fsrdzv.torchrun._logs import show_logs\n"
        "show_logs()\n"
        "logging.getLogger('fsrdzv.progress').info('progress line')\n"
        "logging.getLogger('fsrdzv').debug('debug')\n"
        "logging.getLogger('fsrdzv.store').info('store info')\n"
        "logging.getLogger('fsrdzv').warning('a warning')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOGLEVEL"}
    if loglevel:
        env["LOGLEVEL"] = loglevel
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    lines = [line.split("] ", 1)[1] for line in done.stderr.splitlines() if line.startswith("[fsrdzv ")]
    assert lines == shown, done.stderr
