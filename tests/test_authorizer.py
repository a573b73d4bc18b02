"""The authorizer's token requests and token cache, against small token servers and
registries on 127.0.0.1 (proxyd/auth.py, and exchange.py's 401 handling).

What a token request looks like comes from distribution's token spec
(docs/spec/auth/token.md: a GET repeats `scope`, one scope each) and its OAuth2 spec
(oauth.md: a POST sends one `scope`, a space-separated list), which containerd's
core/remotes/docker/auth/fetch.go follows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import MultiDict

from proxyd.auth import Authorizer
from proxyd.credentials import Credential
from proxyd.hosts import Capability, RegistryHost
from tests.conftest import FakeClock, host, oci_code, origin
from tests.fakes import FakeRegistry, make_image
from tests.test_pull import upstream_config

ALICE = Credential(username="alice", password="wonderland")


@dataclass
class TokenEndpoint:
    """Issues `t1`, `t2`, … at `/token` by GET or POST, recording each request's query
    and form as multi-valued (a repeated `scope` stays repeated), and what each token
    was asked for. `status` answers every request with that status instead; `gate`
    holds answers until set."""

    status: int = 200
    expires_in: int = 300
    gate: asyncio.Event | None = None
    asked: list[tuple[str, MultiDict[str], Any]] = field(default_factory=list)
    scopes: dict[str, set[str]] = field(default_factory=dict)  # token -> scopes asked
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/token", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        form: MultiDict[str] = MultiDict(await request.post())  # type: ignore[arg-type]
        query = MultiDict(request.query)
        self.asked.append(
            (request.method, query if request.method == "GET" else form, request.headers)
        )
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.json_response({"details": "no"}, status=self.status)
        if request.method == "GET":
            scopes = set(query.getall("scope", []))
        else:
            scopes = set(str(form.get("scope", "")).split())
        token = f"t{len(self.scopes) + 1}"
        self.scopes[token] = scopes
        return web.json_response({"token": token, "expires_in": self.expires_in})

    @property
    def fetches(self) -> int:
        return len(self.asked)


def registry_host(server: Any, *headers: tuple[str, str]) -> RegistryHost:
    return RegistryHost(
        "http", host(server), "/v2", Capability.all(), is_mirror=False, headers=headers
    )


async def challenged(
    start: Callable[[Any], Awaitable[Any]],
    tokens: TokenEndpoint,
    credential: Credential | None = None,
    **options: Any,
) -> tuple[Authorizer, RegistryHost, aiohttp.ClientSession]:
    """An authorizer that has learnt a challenge naming `tokens` as its realm."""
    server = await start(tokens)
    session = aiohttp.ClientSession()
    target = registry_host(server)
    authorizer = Authorizer(session, lambda name: credential, **options)
    assert authorizer.learn(target, [f'Bearer realm="{origin(server)}/token",service="reg"'])
    return authorizer, target, session


@pytest.fixture
def start(aiohttp_server: Any) -> Callable[[Any], Awaitable[Any]]:
    async def run(fake: Any) -> Any:
        return await aiohttp_server(fake.app(), host="127.0.0.1")

    return run


# -- what a token request asks for -------------------------------------------------------


async def test_a_get_token_request_repeats_scope_once_per_scope(start):
    tokens = TokenEndpoint()
    authorizer, target, session = await challenged(start, tokens)
    async with session:
        await authorizer.authorization(target, "repository:team/b:pull repository:team/a:pull")
    [(method, query, _headers)] = tokens.asked
    assert method == "GET"
    assert query.getall("scope") == ["repository:team/a:pull", "repository:team/b:pull"]
    assert query.getall("service") == ["reg"]


async def test_an_oauth2_post_sends_one_scope_holding_the_list(start):
    tokens = TokenEndpoint()
    authorizer, target, session = await challenged(start, tokens, ALICE)
    async with session:
        await authorizer.authorization(target, "repository:team/b:pull repository:team/a:pull")
    [(method, form, _headers)] = tokens.asked
    assert method == "POST"
    assert form.getall("scope") == ["repository:team/a:pull repository:team/b:pull"]
    assert form["grant_type"] == "password"


async def test_the_same_scopes_in_another_order_are_the_same_token(start):
    tokens = TokenEndpoint()
    authorizer, target, session = await challenged(start, tokens)
    async with session:
        first = await authorizer.authorization(target, "repository:a:pull repository:b:pull")
        again = await authorizer.authorization(target, "repository:b:pull repository:a:pull")
    assert first == again == "Bearer t1"
    assert tokens.fetches == 1


async def test_concurrent_requests_for_one_scope_share_one_token_fetch(start):
    tokens = TokenEndpoint(gate=asyncio.Event())
    authorizer, target, session = await challenged(start, tokens)
    async with session:
        waiting = [
            asyncio.ensure_future(authorizer.authorization(target, "repository:team/app:pull"))
            for _ in range(20)
        ]
        await asyncio.wait_for(tokens.arrived.wait(), 10)
        tokens.gate.set()  # type: ignore[union-attr]
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert set(answers) == {"Bearer t1"}
    assert tokens.fetches == 1


# -- headers configured for the host -------------------------------------------------------


async def test_host_headers_go_to_a_token_realm_on_the_hosts_own_origin(start):
    """containerd's hosts.go passes a host's `header` to its authorizer (WithAuthHeader),
    which sends them with every token request."""
    tokens = TokenEndpoint()
    server = await start(tokens)
    target = registry_host(server, ("X-Api-Key", "s3cret"))
    async with aiohttp.ClientSession() as session:
        authorizer = Authorizer(session, lambda name: None, user_agent="proxyd-test")
        authorizer.learn(target, [f'Bearer realm="{origin(server)}/token"'])
        await authorizer.authorization(target, "repository:team/app:pull")
    [(_method, _query, headers)] = tokens.asked
    assert headers["X-Api-Key"] == "s3cret"
    assert headers["User-Agent"] == "proxyd-test"


async def test_host_headers_never_go_to_a_token_realm_on_another_origin(start):
    """proxyd's rule, where containerd sends them anyway: a registry's headers may be its
    secrets, and Docker Hub's realm (auth.docker.io) is another host than its registry."""
    tokens = TokenEndpoint()
    server = await start(tokens)
    target = RegistryHost(
        "http", "registry.invalid", "/v2", Capability.all(), False, (("X-Api-Key", "s3cret"),)
    )
    async with aiohttp.ClientSession() as session:
        authorizer = Authorizer(session, lambda name: None)
        authorizer.learn(target, [f'Bearer realm="{origin(server)}/token"'])
        await authorizer.authorization(target, "repository:team/app:pull")
    [(_method, _query, headers)] = tokens.asked
    assert "X-Api-Key" not in headers


# -- the token cache -----------------------------------------------------------------------


async def test_the_token_cache_keeps_the_most_recently_used_tokens_up_to_its_bound(start):
    tokens = TokenEndpoint()
    authorizer, target, session = await challenged(start, tokens, max_tokens=2)
    async with session:
        for repository in ("a", "b", "a", "c"):  # c pushes out b, the least recently used
            await authorizer.authorization(target, f"repository:{repository}:pull")
        assert tokens.fetches == 3
        assert await authorizer.authorization(target, "repository:a:pull") == "Bearer t1"
        assert await authorizer.authorization(target, "repository:c:pull") == "Bearer t3"
        assert tokens.fetches == 3
        await authorizer.authorization(target, "repository:b:pull")
        assert tokens.fetches == 4


async def test_expired_tokens_make_room_before_any_that_still_work(start):
    clock = FakeClock()
    tokens = TokenEndpoint(expires_in=3600)
    authorizer, target, session = await challenged(
        start, tokens, max_tokens=2, clock=clock.monotonic
    )
    async with session:
        await authorizer.authorization(target, "repository:kept:pull")  # the least recent
        tokens.expires_in = 100  # kept for 90 s
        await authorizer.authorization(target, "repository:brief:pull")
        clock.advance(95)
        await authorizer.authorization(target, "repository:new:pull")
        assert tokens.fetches == 3
        assert await authorizer.authorization(target, "repository:kept:pull") == "Bearer t1"
        assert tokens.fetches == 3


# -- 401s through proxyd -------------------------------------------------------------------


@dataclass
class ScopedRegistry(FakeRegistry):
    """A FakeRegistry that accepts only tokens `tokens` issued with the repository's own
    scope, and challenges with that scope (as distribution's accesscontroller.go)."""

    tokens: TokenEndpoint = field(default_factory=TokenEndpoint)

    def _authorized(self, request: web.Request) -> web.Response | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        repository = request.path.removeprefix("/v2/").rsplit("/", 2)[0]
        scope = f"repository:{repository}:pull"
        if scope in self.tokens.scopes.get(token, set()):
            return None
        challenge = f'Bearer realm="{self.bearer_realm}",service="fake",scope="{scope}"'
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]},
            status=401,
            headers={"WWW-Authenticate": challenge},
        )


async def scoped_registry(start: Callable[[Any], Awaitable[Any]]) -> ScopedRegistry:
    upstream = ScopedRegistry()
    upstream.bearer_realm = f"{origin(await start(upstream.tokens))}/token"
    return upstream


async def test_a_token_refused_without_a_reason_is_dropped_and_fetched_again(
    make_proxyd, start, start_fake
):
    """RFC 6750 section 3.1 makes `error=` optional: a registry may refuse a revoked
    token with a bare challenge. A refused token is never sent again (containerd drops
    tokens only when the challenge carries `error=`)."""
    upstream = await scoped_registry(start)
    tokens = upstream.tokens
    for tag in ("v1", "v2"):
        upstream.add(make_image(tag=tag))
    proxyd = await make_proxyd(upstream_config(await start_fake(upstream)))
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    tokens.scopes.clear()  # every token issued so far is revoked

    response = await proxyd.get("/v2/team/app/manifests/v2")

    assert response.status == 200, await response.text()
    assert tokens.fetches == 2


async def test_a_tokens_scope_is_the_requests_not_the_last_challenges(
    make_proxyd, start, start_fake
):
    """A challenge names the scope of the request it refused: merged into later token
    requests for other repositories (proxyd's authorizer serves them all), it would ask
    for access nobody needs, and a token per combination."""
    upstream = await scoped_registry(start)
    tokens = upstream.tokens
    for repository in ("team/one", "team/two"):
        upstream.add(make_image(repository))
    proxyd = await make_proxyd(upstream_config(await start_fake(upstream)))
    for repository in ("team/one", "team/two", "team/one", "team/two"):
        response = await proxyd.get(f"/v2/{repository}/manifests/v1")
        assert response.status == 200, await response.text()
    assert [set(query.getall("scope")) for _m, query, _h in tokens.asked] == [
        {"repository:team/one:pull"},
        {"repository:team/two:pull"},
    ]


async def test_the_retry_asks_for_the_scope_the_challenge_names(make_proxyd, start, start_fake):
    """A registry served under a path (Harbor's proxy-cache projects, with
    `override_path`) names its own repository in the challenge, not the one proxyd
    computed from the client's name: the retry asks for it too, and the token is kept
    for the request's own scope, so the next request needs no 401."""
    upstream = await scoped_registry(start)
    tokens = upstream.tokens
    image = upstream.add(make_image("project/team/app"))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        "\n".join(
            [
                f'default_namespace = "{host(server)}"',
                f'[namespaces."{host(server)}"]',
                f'server = "{origin(server)}/v2/project"',
                "override_path = true",
            ]
        )
    )
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert (await proxyd.get(f"/v2/team/app/blobs/{image.layer}")).status == 200
    assert tokens.fetches == 1
    [(_method, query, _headers)] = tokens.asked
    assert query.getall("scope") == [
        "repository:project/team/app:pull",
        "repository:team/app:pull",
    ]
    assert len([s for s in upstream.seen if "Authorization" not in s.headers]) == 1


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("credentials", [True, False], ids=["alice", "anonymous"])
async def test_a_token_server_refusing_is_a_401_naming_realm_and_host_never_a_loop(
    make_proxyd, start, start_fake, status, credentials
):
    upstream = FakeRegistry()
    tokens = TokenEndpoint(status=status)
    realm = f"{origin(await start(tokens))}/token"
    upstream.bearer_realm = realm
    upstream.add(make_image())
    server = await start_fake(upstream)
    lines = [f'[credentials."{host(server)}"]', 'username = "alice"', 'password = "wonderland"']
    proxyd = await make_proxyd(upstream_config(server, *(lines if credentials else [])))

    response = await proxyd.get("/v2/team/app/manifests/v1")

    assert response.status == 401
    assert await oci_code(response) == "UNAUTHORIZED"
    message = (await response.json())["errors"][0]["message"]
    assert realm in message and host(server) in message, message
    assert ("anonymous" in message) is not credentials, message
    assert tokens.fetches <= 2  # a POST, and the GET it falls back to
    assert len(upstream.seen) == 1
