"""Where a registry may send proxyd (proxyd/targets.py): its redirects and token realms
are followed to http and https addresses only, never to a link-local one (cloud
metadata services answer on 169.254.169.254) unless `allow_link_local` says so, and a
token server's redirect never carries proxyd's credentials to another origin.

Registries that misbehave so are fakes (tests/fakes.py and small apps here); the
link-local targets are IPv6 literals without a zone (fe80::77), which no connection
could reach, so a proxyd that did try fails at once instead of asking a real metadata
service. Names that resolve to link-local addresses are judged by the resolver the
upstream connections use, tested here with a stand-in for the system's resolver.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from proxyd.targets import LinkLocalFilter, RefusedTarget, check, is_link_local
from tests.conftest import origin
from tests.fakes import FakeRegistry, FakeTokenServer, make_image
from tests.test_pull import alice, upstream_config
from tests.test_push import UploadRegistry, push_config, serve, start

METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "[fe80::1]",
        "fe80::1%eth0",
        "::ffff:169.254.1.1",
    ],
)
def test_link_local_addresses_are_known_in_every_spelling(address):
    assert is_link_local(address)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.0.0.1", "::1", "2001:db8::1", "registry.example", "169.254.example"],
)
def test_other_addresses_and_names_are_not_link_local(address):
    assert not is_link_local(address)


@pytest.mark.parametrize(
    "url", [METADATA, "http://[fe80::1]:5000/v2/", "https://[::ffff:169.254.169.254]/token"]
)
def test_a_link_local_target_is_refused_unless_allowed(url):
    with pytest.raises(RefusedTarget, match="link-local"):
        check(url, allow_link_local=False)
    assert check(url, allow_link_local=True) == url


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://cdn.example/blob", "gopher://x/"])
def test_only_http_and_https_targets_are_followed(url):
    for allowed in (False, True):
        with pytest.raises(RefusedTarget, match="not http or https"):
            check(url, allow_link_local=allowed)


class StubResolver(AbstractResolver):
    """The system's resolver, as a name pointed at the metadata service would answer."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.answers[host]
        ]

    async def close(self) -> None:
        pass


async def test_a_name_resolving_to_link_local_addresses_only_is_refused_unless_configured():
    stub = StubResolver(
        {
            "metadata.example": ["169.254.169.254"],
            "both.example": ["169.254.1.1", "192.0.2.7"],
            "zeroconf.local": ["169.254.3.3"],  # a registry the user configured
        }
    )
    resolver = LinkLocalFilter(stub, trusted={"zeroconf.local"}.__contains__)
    with pytest.raises(OSError, match="link-local addresses only"):
        await resolver.resolve("metadata.example", 80)
    assert [r["host"] for r in await resolver.resolve("both.example", 80)] == ["192.0.2.7"]
    assert [r["host"] for r in await resolver.resolve("zeroconf.local", 80)] == ["169.254.3.3"]


async def test_a_registrys_redirect_to_a_link_local_address_is_refused(make_proxyd, start_fake):
    upstream = FakeRegistry(redirect_blobs_to="http://[fe80::77]:8080")
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert response.status == 502
    message = (await response.json())["errors"][0]["message"]
    assert "[fe80::77]" in message and "link-local" in message, message


async def test_a_token_realm_at_a_link_local_address_is_refused(make_proxyd, start_fake):
    upstream = FakeRegistry(bearer_realm="http://[fe80::77]/token")
    upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server, *alice(server)))
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 502
    message = (await response.json())["errors"][0]["message"]
    assert "token server http://[fe80::77]/token" in message and "link-local" in message


def redirecting_to(target: str) -> web.Application:
    """A token server that answers every request with a 307 to `target`."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


async def test_a_token_servers_redirect_to_another_origin_never_carries_the_password(
    make_proxyd, start_fake, aiohttp_server: Any
):
    upstream = FakeRegistry()
    upstream.add(make_image())
    elsewhere = FakeTokenServer(upstream)  # another origin, which would grant a token
    elsewhere_server = await start_fake(elsewhere)
    realm = await aiohttp_server(redirecting_to(f"{origin(elsewhere_server)}/token"))
    upstream.bearer_realm = f"http://127.0.0.1:{realm.port}/token"
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server, *alice(server)))
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 502
    message = (await response.json())["errors"][0]["message"]
    assert "another origin" in message, message
    assert elsewhere.seen == [], "the token request followed the redirect to another origin"


async def test_a_token_servers_redirect_within_its_origin_is_followed_with_the_credentials(
    make_proxyd, start_fake, aiohttp_server: Any
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    tokens = FakeTokenServer(upstream)
    app = tokens.app()

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/token")  # 308: the POST and its form again

    app.router.add_route("*", "/old-token", moved)
    token_server = await aiohttp_server(app)
    upstream.bearer_realm = f"http://127.0.0.1:{token_server.port}/old-token"
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server, *alice(server)))
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 200
    assert await response.read() == image.manifest
    assert [(s.method, s.query.get("username")) for s in tokens.seen] == [("POST", "alice")]


async def test_an_upload_a_registry_moves_to_a_link_local_address_goes_nowhere(
    make_proxyd, start_fake
):
    """An upload's Location on another origin is followed bare (object storage); one
    on a link-local address not at all: the chunk is the registry's failure, a 502."""
    upstream = UploadRegistry()
    upstream.storage_host = "[fe80::77]:8080"
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    started = await start(proxyd)
    assert started.status == 202, await started.text()
    patched = await proxyd.patch(
        started.headers["Location"],
        data=b"layer" * 100,
        headers={"Content-Type": "application/octet-stream", "Content-Range": "0-499"},
    )
    assert patched.status == 502
    message = (await patched.json())["errors"][0]["message"]
    assert "[fe80::77]" in message and "link-local" in message, message
