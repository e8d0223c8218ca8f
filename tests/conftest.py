"""Shared pytest fixtures. Keep this file small: helpers live in modules such as tests/servers.py.

Object-store fixtures start real servers once per session (moto, Azurite, fake-gcs-server on 127.0.0.1) and hand
each test an :class:`~tests.servers.Endpoint` with a fresh prefix: ``url, storage_options, env = s3_endpoint``.
A server that cannot start skips its tests outside CI and fails them when ``CI`` is set, so a CI run can never
pass by silently skipping the object stores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import Endpoint, Server, ServerUnavailable, in_ci, start_server


def _serve(kind: str) -> Iterator[Server]:
    try:
        server = start_server(kind)
    except ServerUnavailable as exc:
        if in_ci():
            pytest.fail(f"{exc}\n(CI is set: object-store tests must run, not be skipped)", pytrace=False)
        pytest.skip(f"{kind} test server unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Server]:
    yield from _serve("s3")


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[Server]:
    yield from _serve("azure")


@pytest.fixture(scope="session")
def fake_gcs_server() -> Iterator[Server]:
    yield from _serve("gcs")


@pytest.fixture
def s3_endpoint(moto_server: Server) -> Endpoint:
    """``s3://bucket/<fresh prefix>`` on moto, with storage options and the equivalent environment."""
    return moto_server.endpoint()


@pytest.fixture
def azure_endpoint(azurite_server: Server) -> Endpoint:
    """``az://container/<fresh prefix>`` on Azurite, with storage options and the equivalent environment."""
    return azurite_server.endpoint()


@pytest.fixture
def gcs_endpoint(fake_gcs_server: Server) -> Endpoint:
    """``gs://bucket/<fresh prefix>`` on fake-gcs-server, with storage options and the equivalent environment."""
    return fake_gcs_server.endpoint()


@pytest.fixture(params=["s3", "azure", "gcs"])
def object_endpoint(request: pytest.FixtureRequest) -> Endpoint:
    """Each object store in turn (a test using it runs three times)."""
    endpoint: Endpoint = request.getfixturevalue(f"{request.param}_endpoint")
    return endpoint
