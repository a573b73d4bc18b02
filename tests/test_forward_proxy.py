"""Pulls through a real forward proxy (Debian's tinyproxy, tests/peers/tinyproxy.py),
as on a network that reaches registries only through `HTTPS_PROXY`.

proxyd runs in this process; the fake registries, their token server and their blob
storage listen on the test's end of a veth pair (tests/peers/netns.py), an address
that is not loopback, so the environment's proxy applies to them as Go's rules say;
tinyproxy runs inside the namespace at the pair's other end. A request proxyd sent
itself would come from the test's own address; one through the proxy comes from the
namespace's. So "the upstream saw only the proxy's address" proves no request
bypassed the proxy, for plain HTTP and for the tunnels (CONNECT) of HTTPS alike, and
the proxy's log shows each request it took.

The proxy's credentials are tested on loopback (where a host's own `proxy` applies,
as an explicit setting does whatever the address).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from tests.fakes import FakeImage, FakeRegistry, FakeTokenServer, make_image
from tests.peers.netns import NetNamespace
from tests.peers.tinyproxy import TinyProxy

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_from_the_callers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@dataclass
class Network:
    """The test's address on the veth pair, and the proxy at the other end."""

    address: str  # where the fakes listen; where proxyd's own connections come from
    proxy: TinyProxy


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    with (
        NetNamespace(veth=True) as namespace,
        TinyProxy(tmp_path / "tinyproxy", netns=namespace) as proxy,
    ):
        assert namespace.outside_address is not None
        yield Network(namespace.outside_address, proxy)


def remembering_peers(app: web.Application, peers: list[str]) -> web.Application:
    """`app`, noting the address each request came from."""

    @web.middleware
    async def remember(request: web.Request, handler: Any) -> web.StreamResponse:
        peers.append(str(request.remote))
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(remember)
    return app


@dataclass
class Registry:
    """A registry wanting tokens from a server on another origin, its blobs
    redirected to storage on a third: the three origins of a Docker Hub pull."""

    upstream: FakeRegistry
    tokens: FakeTokenServer
    storage: FakeRegistry
    image: FakeImage
    servers: list[TestServer]
    peers: list[str]

    @property
    def server(self) -> TestServer:
        return self.servers[-1]

    def origins(self) -> set[str]:
        return {f"{self.server.host}:{s.port}" for s in self.servers}


async def start_registry(
    aiohttp_server: Any, address: str, context: ssl.SSLContext | None = None
) -> Registry:
    scheme = "https" if context else "http"
    peers: list[str] = []
    upstream, storage = FakeRegistry(), FakeRegistry()
    image = upstream.add(make_image())
    storage.add(image)
    tokens = FakeTokenServer(upstream)
    servers = []
    for app in (tokens.app(), storage.app(), upstream.app()):
        servers.append(
            await aiohttp_server(remembering_peers(app, peers), host=address, ssl=context)
        )
    upstream.bearer_realm = f"{scheme}://{address}:{servers[0].port}/token"
    upstream.redirect_blobs_to = f"{scheme}://{address}:{servers[1].port}"
    return Registry(upstream, tokens, storage, image, servers, peers)


def config(registry: Registry, *lines: str, scheme: str = "http") -> str:
    name = f"{registry.server.host}:{registry.server.port}"
    return "\n".join(
        [
            f'default_namespace = "{name}"',
            f'[namespaces."{name}"]',
            f'server = "{scheme}://{name}"',
            *lines,
        ]
    )


async def pull(proxyd: Any, image: FakeImage) -> list[tuple[int, bytes]]:
    results = []
    for path in (
        f"/v2/{image.repository}/manifests/{image.tag}",
        *(f"/v2/{image.repository}/blobs/{digest}" for digest in image.blobs),
    ):
        response = await proxyd.get(path)
        results.append((response.status, await response.read()))
    return results


def pulled(image: FakeImage) -> list[tuple[int, bytes]]:
    return [(200, image.manifest), *((200, blob) for blob in image.blobs.values())]


@dataclass
class PKI:
    ca_pem: Path
    context: ssl.SSLContext


def make_pki(tmp_path: Path, *names: str) -> PKI:
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(context)
    ca_pem = tmp_path / "proxy-test-ca.pem"
    ca.cert_pem.write_to_path(ca_pem)
    return PKI(ca_pem, context)


# -- the environment's proxy ----------------------------------------------------------


async def test_https_proxy_carries_every_request_of_a_pull_through_its_tunnels(
    make_proxyd, aiohttp_server, network, tmp_path, monkeypatch
):
    pki = make_pki(tmp_path, network.address)
    registry = await start_registry(aiohttp_server, network.address, pki.context)
    monkeypatch.setenv("HTTPS_PROXY", network.proxy.url)
    proxyd = await make_proxyd(config(registry, f'ca = "{pki.ca_pem}"', scheme="https"))
    assert await pull(proxyd, registry.image) == pulled(registry.image)
    assert registry.tokens.seen and registry.storage.seen  # all three origins were asked
    assert set(registry.peers) == {network.proxy.address}  # none came from proxyd itself
    forwarded = network.proxy.forwarded()
    assert {f.method for f in forwarded} == {"CONNECT"}
    assert {f.target for f in forwarded} == registry.origins()


async def test_http_proxy_carries_every_request_to_a_plain_http_registry(
    make_proxyd, aiohttp_server, network, monkeypatch
):
    registry = await start_registry(aiohttp_server, network.address)
    monkeypatch.setenv("http_proxy", network.proxy.url)  # the lower-case spelling
    proxyd = await make_proxyd(config(registry))
    assert await pull(proxyd, registry.image) == pulled(registry.image)
    assert set(registry.peers) == {network.proxy.address}
    seen = [*registry.upstream.seen, *registry.tokens.seen, *registry.storage.seen]
    assert all("tinyproxy" in s.headers.get("Via", "") for s in seen)
    forwarded = network.proxy.forwarded()
    assert len(forwarded) == len(seen)
    assert {f.target.split("/")[2] for f in forwarded} == registry.origins()
    assert all(f.method == "GET" and f.target.startswith("http://") for f in forwarded)


async def test_no_proxy_sends_a_registry_direct(make_proxyd, aiohttp_server, network, monkeypatch):
    registry = await start_registry(aiohttp_server, network.address)
    monkeypatch.setenv("HTTP_PROXY", network.proxy.url)
    monkeypatch.setenv("NO_PROXY", f"example.com, {network.address}")
    proxyd = await make_proxyd(config(registry))
    assert await pull(proxyd, registry.image) == pulled(registry.image)
    assert set(registry.peers) == {network.address}
    assert network.proxy.forwarded() == []


async def test_an_unreachable_proxy_is_a_502_naming_the_proxy(
    make_proxyd, aiohttp_server, network, monkeypatch
):
    registry = await start_registry(aiohttp_server, network.address)
    monkeypatch.setenv("HTTP_PROXY", f"http://{network.proxy.address}:1")
    proxyd = await make_proxyd(config(registry))
    response = await proxyd.get(f"/v2/team/app/manifests/{registry.image.tag}")
    assert response.status == 502
    message = (await response.json())["errors"][0]["message"]
    assert f"cannot connect to the proxy {network.proxy.address}:1" in message
    assert registry.peers == []  # and never around it


# -- a host's own proxy -----------------------------------------------------------------


async def test_a_hosts_own_proxy_wins_over_the_environment(
    make_proxyd, aiohttp_server, network, monkeypatch
):
    registry = await start_registry(aiohttp_server, network.address)
    monkeypatch.setenv("HTTP_PROXY", f"http://{network.proxy.address}:1")  # nothing there
    proxyd = await make_proxyd(config(registry, f'proxy = "{network.proxy.url}"'))
    assert await pull(proxyd, registry.image) == pulled(registry.image)
    assert set(registry.peers) == {network.proxy.address}  # its token server, storage too


async def test_proxy_direct_ignores_the_environment(
    make_proxyd, aiohttp_server, network, monkeypatch
):
    registry = await start_registry(aiohttp_server, network.address)
    monkeypatch.setenv("HTTP_PROXY", network.proxy.url)
    proxyd = await make_proxyd(config(registry, 'proxy = "direct"'))
    assert await pull(proxyd, registry.image) == pulled(registry.image)
    assert set(registry.peers) == {network.address}
    assert network.proxy.forwarded() == []


# -- the proxy's credentials ------------------------------------------------------------


@pytest.fixture
def guarded_proxy(tmp_path: Path) -> Iterator[TinyProxy]:
    with TinyProxy(tmp_path / "guarded", basic_auth=("alice", "s3cret-proxy")) as proxy:
        yield proxy


def with_password(proxy: TinyProxy, password: str) -> str:
    return f'proxy = "http://alice:{password}@{proxy.address}:{proxy.port}"'


async def test_proxy_credentials_go_to_the_proxy_alone_and_never_to_the_log(
    make_proxyd, aiohttp_server, guarded_proxy
):
    registry = await start_registry(aiohttp_server, "127.0.0.1")
    proxyd = await make_proxyd(config(registry, with_password(guarded_proxy, "s3cret-proxy")))
    with capture_logs() as logs:
        assert await pull(proxyd, registry.image) == pulled(registry.image)
    seen = [*registry.upstream.seen, *registry.tokens.seen, *registry.storage.seen]
    assert len(guarded_proxy.forwarded()) == len(seen)  # every one through the proxy
    for request in seen:
        assert "Proxy-Authorization" not in request.headers
        assert "tinyproxy" in request.headers.get("Via", "")
    assert "s3cret-proxy" not in repr(logs)


async def test_proxy_credentials_open_the_tunnel_to_an_https_registry(
    make_proxyd, aiohttp_server, guarded_proxy, tmp_path
):
    pki = make_pki(tmp_path, "127.0.0.1")
    registry = await start_registry(aiohttp_server, "127.0.0.1", pki.context)
    proxyd = await make_proxyd(
        config(
            registry,
            f'ca = "{pki.ca_pem}"',
            with_password(guarded_proxy, "s3cret-proxy"),
            scheme="https",
        )
    )
    assert await pull(proxyd, registry.image) == pulled(registry.image)
    assert {f.target for f in guarded_proxy.forwarded()} == registry.origins()
    seen = [*registry.upstream.seen, *registry.tokens.seen, *registry.storage.seen]
    assert all("Proxy-Authorization" not in s.headers for s in seen)


async def registry_behind(
    aiohttp_server: Any, tmp_path: Path, scheme: str, *lines: str
) -> tuple[Registry, list[str]]:
    pki = make_pki(tmp_path, "127.0.0.1")
    context = pki.context if scheme == "https" else None
    registry = await start_registry(aiohttp_server, "127.0.0.1", context)
    return registry, [f'ca = "{pki.ca_pem}"', *lines]


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_asking_for_credentials_is_a_502_saying_so(
    make_proxyd, aiohttp_server, guarded_proxy, tmp_path, scheme
):
    registry, lines = await registry_behind(
        aiohttp_server, tmp_path, scheme, f'proxy = "{guarded_proxy.url}"'
    )
    proxyd = await make_proxyd(config(registry, *lines, scheme=scheme))
    response = await proxyd.get(f"/v2/team/app/manifests/{registry.image.tag}")
    assert response.status == 502
    message = (await response.json())["errors"][0]["message"]
    assert "the proxy answered 407 Proxy Authentication Required" in message
    assert registry.peers == []


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_wrong_proxy_password_is_never_shown(
    make_proxyd, aiohttp_server, guarded_proxy, tmp_path, scheme
):
    """tinyproxy answers a wrong password with a 401 of its own (not a 407), which
    proxyd cannot tell from the registry's; whatever the answer, the password is
    neither in it nor in the log, and the registry is not reached."""
    registry, lines = await registry_behind(
        aiohttp_server, tmp_path, scheme, with_password(guarded_proxy, "wrong-password")
    )
    proxyd = await make_proxyd(config(registry, *lines, scheme=scheme))
    with capture_logs() as logs:
        response = await proxyd.get(f"/v2/team/app/manifests/{registry.image.tag}")
    assert response.status in (401, 502)
    assert "wrong-password" not in await response.text()
    assert "wrong-password" not in repr(logs)
    assert registry.peers == []
