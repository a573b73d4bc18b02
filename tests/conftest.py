"""Fixtures shared by the in-process tests: fake upstreams on real TCP ports, and a
proxyd app configured by a TOML text, exactly as a user would write it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxyd.config import build_registry, load_settings
from proxyd.server import AccessLogger, create_app
from proxyd.server.fastpath import ProxydRunner
from tests.fakes import FakeRegistry, FakeTokenServer

MakeProxyd = Callable[..., Awaitable[TestClient[Any, Any]]]


class ProxydTestServer(TestServer):
    """A test server with the runner `proxyd serve` uses (remembered answers included)."""

    async def _make_runner(self, **kwargs: Any) -> ProxydRunner:
        return ProxydRunner(self.app, **kwargs)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_proxyd(aiohttp_client: Any, tmp_path: Path, cache_dir: Path) -> MakeProxyd:
    async def make(config: str, **flags: Any) -> TestClient[Any, Any]:
        path = tmp_path / "proxyd.toml"
        path.write_text(config)
        flags.setdefault("cache_dir", cache_dir)
        settings = load_settings(path, **flags)
        server = ProxydTestServer(create_app(build_registry(settings)), host="127.0.0.1")
        await server.start_server(access_log_class=AccessLogger)  # as `proxyd serve` does
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return make


@pytest.fixture
def start_fake(aiohttp_server: Any) -> Callable[[Any], Awaitable[TestServer]]:
    async def start(fake: FakeRegistry | FakeTokenServer) -> TestServer:
        server: TestServer = await aiohttp_server(fake.app(), host="127.0.0.1")
        return server

    return start


def origin(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def host(server: TestServer) -> str:
    return f"127.0.0.1:{server.port}"


async def oci_code(response: Any) -> str:
    """The code of the first error in an OCI error answer, which must be JSON."""
    assert response.headers["Content-Type"].startswith("application/json")
    code: str = (await response.json())["errors"][0]["code"]
    return code


async def until_stored(cache_dir: Path, digest: str, within: float = 10.0) -> Path:
    """The blob's path once it is in the store. A download releases its last byte as
    soon as the digest is verified and renames the file into place after its fsync,
    so a client can have the whole blob a moment before the store does."""
    algorithm, hex_ = digest.split(":")
    path = cache_dir / "blobs" / algorithm / hex_
    async with asyncio.timeout(within):
        while not path.exists():
            await asyncio.sleep(0.005)
    return path
