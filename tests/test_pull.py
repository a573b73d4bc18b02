"""The pull path end to end in one process: proxyd's app in front of fake registries."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.conftest import FakeClock, host, oci_code, origin, until, until_logged, until_stored
from tests.fakes import FakeImage, FakeRegistry, FakeTokenServer, make_image


def upstream_config(server: object, *extra: str) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
            *extra,
        ]
    )


async def behind_token_server(
    start_fake: Any, mode: str = "ok"
) -> tuple[FakeRegistry, FakeTokenServer, Any, FakeImage]:
    """A registry that wants tokens from a FakeTokenServer, serving one image."""
    upstream = FakeRegistry()
    tokens = FakeTokenServer(upstream, mode=mode)
    upstream.bearer_realm = f"{origin(await start_fake(tokens))}/token"
    image = upstream.add(make_image())
    return upstream, tokens, await start_fake(upstream), image


def alice(server: object, password: str = "wonderland") -> list[str]:
    """proxyd's credentials for the server, as TOML lines."""
    return [f'[credentials."{host(server)}"]', 'username = "alice"', f'password = "{password}"']


async def test_base_endpoint_announces_the_registry_api(make_proxyd):
    proxyd = await make_proxyd("")
    response = await proxyd.get("/v2/")
    assert response.status == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_pull_by_tag_then_blobs_are_served_from_the_store(
    make_proxyd, start_fake, cache_dir: Path
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))

    manifest = await proxyd.get("/v2/team/app/manifests/v1")
    assert manifest.status == 200
    assert await manifest.read() == image.manifest
    assert manifest.headers["Docker-Content-Digest"] == image.digest
    assert manifest.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"

    for _ in range(2):
        blob = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
        assert blob.status == 200
        assert await blob.read() == image.blobs[image.layer]
        assert blob.headers["Docker-Content-Digest"] == image.layer
        await until_stored(cache_dir, image.layer)
    assert len(upstream.requests(f"/blobs/{image.layer}")) == 1
    assert blob.headers["X-Proxyd-Cache"] == "hit"

    by_digest = await proxyd.get(f"/v2/team/app/manifests/{image.digest}")
    assert await by_digest.read() == image.manifest
    assert by_digest.headers["X-Proxyd-Cache"] == "hit"
    assert len(upstream.requests(f"/manifests/{image.digest}")) == 0


async def test_head_of_a_tag_answers_digest_and_size_without_a_body(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.head("/v2/team/app/manifests/v1")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert response.headers["Content-Length"] == str(len(image.manifest))
    assert await response.read() == b""


async def test_blob_range_from_the_store_answers_206(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    await (await proxyd.get(f"/v2/team/app/blobs/{image.layer}")).read()
    response = await proxyd.get(
        f"/v2/team/app/blobs/{image.layer}", headers={"Range": "bytes=10-19"}
    )
    assert response.status == 206
    assert await response.read() == image.blobs[image.layer][10:20]


async def test_every_accept_header_is_passed_upstream(make_proxyd, start_fake):
    upstream = FakeRegistry()
    upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    accept = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
    await proxyd.get("/v2/team/app/manifests/v1", headers=[("Accept", a) for a in accept])
    assert upstream.requests("/manifests/v1")[0].headers.getall("Accept") == accept


async def test_ns_query_selects_the_namespace_and_is_not_forwarded(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        upstream_config(server).replace(f'default_namespace = "{host(server)}"', "")
    )
    response = await proxyd.get("/v2/team/app/manifests/v1", params={"ns": host(server)})
    assert response.status == 200
    assert await response.read() == image.manifest
    assert "ns" not in upstream.requests("/manifests/v1")[0].query


async def test_registry_host_as_first_path_component_selects_the_namespace(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        upstream_config(server).replace(f'default_namespace = "{host(server)}"', "")
    )
    response = await proxyd.get(f"/v2/{host(server)}/team/app/manifests/v1")
    assert response.status == 200
    assert await response.read() == image.manifest
    assert upstream.requests()[0].path == "/v2/team/app/manifests/v1"


async def test_one_component_docker_hub_names_get_library(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image("library/alpine", "3"))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(f'[namespaces."docker.io"]\nserver = "{origin(server)}"\n')
    response = await proxyd.get("/v2/alpine/manifests/3")
    assert response.status == 200
    assert await response.read() == image.manifest


async def test_tag_list_passes_pagination_on(make_proxyd, start_fake):
    upstream = FakeRegistry()
    upstream.add(make_image(tag="v1"))
    upstream.add(make_image(tag="v2"))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.get("/v2/team/app/tags/list", params={"n": "10", "last": "v0"})
    assert response.status == 200
    assert await response.json() == {"name": "team/app", "tags": ["v1", "v2"]}
    assert upstream.requests("/tags/list")[0].query == {"n": "10", "last": "v0"}


async def test_unknown_manifest_is_manifest_unknown(make_proxyd, start_fake):
    upstream = FakeRegistry()
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.get("/v2/team/app/manifests/nope")
    assert response.status == 404
    assert await oci_code(response) == "MANIFEST_UNKNOWN"


async def test_bad_input_gets_oci_errors(make_proxyd, start_fake):
    upstream = FakeRegistry()
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    cases = {
        "/v2/Team/App/manifests/v1": (400, "NAME_INVALID"),
        "/v2/team/app/manifests/-bad": (404, "MANIFEST_UNKNOWN"),  # see the next test
        "/v2/team/app/blobs/sha256:short": (400, "DIGEST_INVALID"),
        "/v2/team/app/blobs/md5:" + "0" * 32: (400, "DIGEST_INVALID"),
        "/v2/team/app/blobs/latest": (400, "DIGEST_INVALID"),
        "/v2/team/app/nothing/here": (404, "UNSUPPORTED"),
        "/v2/unknown.example:5000/team/app/manifests/v1": (404, "NAME_UNKNOWN"),
    }
    for path, (status, code) in cases.items():
        response = await proxyd.get(path)
        assert response.status == status, path
        assert await oci_code(response) == code, path
    assert upstream.seen == []


async def test_a_tag_the_grammar_refuses_is_404_to_a_pull_and_400_to_a_push(
    make_proxyd, start_fake
):
    """The distribution spec: a GET or HEAD of a manifest that is not there is a 404,
    and no manifest can have an invalid tag (the conformance suite asks for
    `.INVALID_MANIFEST_NAME`); a PUT of one is the client's mistake, TAG_INVALID."""
    upstream = FakeRegistry()
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server, "allow_push = true"))
    for method in ("GET", "HEAD"):
        for tag in (".INVALID_MANIFEST_NAME", "-bad", "x" * 129):
            response = await proxyd.request(method, f"/v2/team/app/manifests/{tag}")
            assert response.status == 404, (method, tag)
            if method == "GET":
                assert await oci_code(response) == "MANIFEST_UNKNOWN"
    pushed = await proxyd.put("/v2/team/app/manifests/.INVALID_MANIFEST_NAME", data=b"{}")
    assert pushed.status == 400
    assert await oci_code(pushed) == "TAG_INVALID"
    assert upstream.seen == []


async def test_unconfigured_ns_is_refused(make_proxyd):
    proxyd = await make_proxyd("")
    response = await proxyd.get("/v2/team/app/manifests/v1", params={"ns": "evil.example"})
    assert response.status == 404
    assert await oci_code(response) == "NAME_UNKNOWN"


async def test_pushes_are_refused_unless_the_namespace_allows_them(make_proxyd, start_fake):
    upstream = FakeRegistry()
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.post("/v2/team/app/blobs/uploads/")
    assert response.status == 405
    assert await oci_code(response) == "UNSUPPORTED"
    assert upstream.seen == []


async def test_corrupt_blob_fails_the_client_and_stores_nothing(
    make_proxyd, start_fake, cache_dir: Path
):
    upstream = FakeRegistry(corrupt=True)
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert not (cache_dir / "blobs" / "sha256" / image.layer.split(":")[1]).exists()
    assert list((cache_dir / "tmp").iterdir()) == []

    upstream.corrupt = False
    retry = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await retry.read() == image.blobs[image.layer]


async def test_broken_upstream_connection_fails_the_client_and_keeps_nothing(
    make_proxyd, start_fake, cache_dir: Path
):
    upstream = FakeRegistry(drop_after=100)
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert not (cache_dir / "blobs" / "sha256" / image.layer.split(":")[1]).exists()


async def test_manifest_over_the_size_limit_is_refused(make_proxyd, start_fake):
    upstream = FakeRegistry()
    upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server), max_manifest_size=100)
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 413
    assert await oci_code(response) == "SIZE_INVALID"


async def test_concurrent_requests_share_one_upstream_fetch_and_all_stream(make_proxyd, start_fake):
    upstream = FakeRegistry(gate=asyncio.Event())
    image = upstream.add(make_image(layer=b"x" * 3_000_000))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))

    async def pull() -> bytes:
        response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
        assert response.status == 200
        first = await response.content.read(1000)  # arrives before the download ends
        assert upstream.gate is not None
        upstream.gate.set()
        return first + await response.read()

    bodies = await asyncio.wait_for(asyncio.gather(*(pull() for _ in range(10))), 30)
    assert all(body == image.blobs[image.layer] for body in bodies)
    assert len(upstream.requests(f"/blobs/{image.layer}")) == 1


async def test_blob_cached_for_one_repository_is_confirmed_before_another_gets_it(
    make_proxyd, start_fake
):
    upstream = FakeRegistry()
    shared = b"shared-layer" * 500
    upstream.add(make_image("team/one", layer=shared))
    other = upstream.add(make_image("team/two", layer=shared))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    layer = other.layer
    assert (await (await proxyd.get(f"/v2/team/one/blobs/{layer}")).read()) == shared

    secret = await proxyd.get(f"/v2/team/secret/blobs/{layer}")
    assert secret.status == 404
    assert await oci_code(secret) == "BLOB_UNKNOWN"

    two = await proxyd.get(f"/v2/team/two/blobs/{layer}")
    assert await two.read() == shared
    assert [s.method for s in upstream.requests(f"team/two/blobs/{layer}")] == ["HEAD"]


async def test_token_auth_is_answered_by_proxyd_and_tokens_are_reused(make_proxyd, start_fake):
    _upstream, tokens, server, image = await behind_token_server(start_fake)
    proxyd = await make_proxyd(upstream_config(server, *alice(server)))
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    for digest in image.blobs:
        assert (await proxyd.get(f"/v2/team/app/blobs/{digest}")).status == 200
    assert tokens.issued == 1
    post = tokens.seen[0]
    assert post.method == "POST"
    assert post.query["grant_type"] == "password"
    assert post.query["scope"] == "repository:team/app:pull"
    assert post.query["service"] == "fake"


async def test_token_post_unsupported_falls_back_to_get_with_basic(make_proxyd, start_fake):
    _upstream, tokens, server, _image = await behind_token_server(
        start_fake, mode="post-unsupported"
    )
    proxyd = await make_proxyd(upstream_config(server, *alice(server)))
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert [s.method for s in tokens.seen] == ["POST", "GET"]
    assert tokens.seen[1].headers["Authorization"].startswith("Basic ")


async def test_anonymous_token_is_fetched_with_get(make_proxyd, start_fake):
    _upstream, tokens, server, _image = await behind_token_server(start_fake)
    proxyd = await make_proxyd(upstream_config(server))
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert tokens.seen[0].method == "GET"
    assert "Authorization" not in tokens.seen[0].headers


async def test_rejected_credentials_are_a_401_not_a_loop(make_proxyd, start_fake):
    upstream, _tokens, server, _image = await behind_token_server(start_fake, mode="refuse")
    proxyd = await make_proxyd(upstream_config(server, *alice(server, password="wrong")))
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 401
    error = (await response.json())["errors"][0]
    assert error["code"] == "UNAUTHORIZED"
    assert "refused" in error["message"]
    assert len(upstream.seen) <= 2


async def test_token_server_without_a_token_is_a_clear_error(make_proxyd, start_fake):
    _upstream, _tokens, server, _image = await behind_token_server(start_fake, mode="no-token")
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 502
    assert "did not include a token" in (await response.json())["errors"][0]["message"]


async def test_basic_auth_upstream(make_proxyd, start_fake):
    upstream = FakeRegistry(basic=("alice", "wonderland"))
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server, *alice(server)))
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 200
    assert await response.read() == image.manifest


async def test_redirect_to_another_host_carries_no_credentials(make_proxyd, start_fake):
    storage = FakeRegistry()
    upstream = FakeRegistry(basic=("alice", "wonderland"))
    image = upstream.add(make_image())
    storage.add(image)
    storage_server = await start_fake(storage)
    upstream.redirect_blobs_to = origin(storage_server)
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server, *alice(server)))
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await response.read() == image.blobs[image.layer]
    assert storage.seen, "the redirect was not followed"
    assert all("Authorization" not in s.headers for s in storage.seen)


async def test_a_redirect_to_another_host_carries_none_of_the_hosts_configured_headers(
    make_proxyd, start_fake
):
    """hosts.toml `header` is for the registry: after a 307 to blob storage neither a
    configured Authorization nor any other configured header goes along."""
    storage = FakeRegistry()
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    storage.add(image)
    upstream.redirect_blobs_to = origin(await start_fake(storage))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        upstream_config(
            server,
            f'[namespaces."{host(server)}".header]',
            'Authorization = "Bearer configured-secret"',
            '"X-Api-Key" = ["key-1", "key-2"]',
        )
    )
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await response.read() == image.blobs[image.layer]
    (asked,) = upstream.requests("/blobs/")
    assert asked.headers.getall("X-Api-Key") == ["key-1", "key-2"]
    assert asked.headers["Authorization"] == "Bearer configured-secret"
    assert storage.seen, "the redirect was not followed"
    for seen in storage.seen:
        assert "Authorization" not in seen.headers
        assert "X-Api-Key" not in seen.headers
        assert seen.headers["User-Agent"].startswith("proxyd/")  # proxyd's own still go


async def test_mirror_failures_fall_back_to_upstream_without_its_credentials(
    make_proxyd, start_fake, tmp_path
):
    upstream = FakeRegistry(basic=("alice", "wonderland"))
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    mirrors = (FakeRegistry(), FakeRegistry(status=500), FakeRegistry(hang=True))
    for number, mirror in enumerate(mirrors):
        mirror_server = await start_fake(mirror)
        proxyd = await make_proxyd(
            upstream_config(
                server,
                f'[namespaces."{host(server)}".host."{origin(mirror_server)}"]',
                'capabilities = ["pull", "resolve"]',
                "read_timeout = 0.5",
                f'[credentials."{host(server)}"]',
                'username = "alice"',
                'password = "wonderland"',
            ),
            cache_dir=tmp_path / f"cache-{number}",
        )
        response = await proxyd.get("/v2/team/app/manifests/v1")
        assert response.status == 200, mirror
        assert await response.read() == image.manifest
        assert mirror.seen, "the mirror was not tried first"
        assert all("Authorization" not in s.headers for s in mirror.seen)


async def test_mirror_serves_pulls_but_tags_resolve_only_where_allowed(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    mirror = FakeRegistry()
    mirror.add(image)
    server, mirror_server = await start_fake(upstream), await start_fake(mirror)
    proxyd = await make_proxyd(
        upstream_config(
            server,
            f'[namespaces."{host(server)}".host."{origin(mirror_server)}"]',
            'capabilities = ["pull"]',
        )
    )
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    blob = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await blob.read() == image.blobs[image.layer]
    assert [s.path for s in mirror.seen] == [f"/v2/team/app/blobs/{image.layer}"]
    # The upstream confirms the repository holds what the mirror served (a HEAD, after).
    await until(lambda: len(upstream.seen) == 2)
    assert [(s.method, s.path) for s in upstream.seen] == [
        ("GET", "/v2/team/app/manifests/v1"),
        ("HEAD", f"/v2/team/app/blobs/{image.layer}"),
    ]


async def test_all_hosts_rate_limited_is_429_with_retry_after(make_proxyd, start_fake):
    upstream = FakeRegistry(status=429, retry_after="7")
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server), clock=FakeClock())  # waits 7 s on it
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
    assert await oci_code(response) == "TOOMANYREQUESTS"


async def test_unreachable_upstream_is_a_502_naming_the_host(make_proxyd):
    proxyd = await make_proxyd(
        'default_namespace = "127.0.0.1:9"\n[namespaces."127.0.0.1:9"]\nserver = "http://127.0.0.1:9"\n'
    )
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 502
    body = await response.json()
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert "127.0.0.1:9" in body["errors"][0]["message"]


async def test_a_chain_without_a_capable_host_is_a_clear_error(make_proxyd, start_fake):
    upstream = FakeRegistry()
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server, 'capabilities = ["pull"]'))
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 502
    assert "resolve" in (await response.json())["errors"][0]["message"]
    assert upstream.seen == []


async def test_responses_are_json_oci_errors_never_tracebacks(make_proxyd):
    proxyd = await make_proxyd("")
    response = await proxyd.get("/v2/../../etc/passwd")
    assert response.status in (400, 404)
    assert "errors" in json.loads(await response.text())


async def test_each_request_is_one_access_log_event(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    with capture_logs() as logs:
        response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
        body = await response.read()
        await until_logged(proxyd)  # the event is written once the response is sent
    [event] = [e for e in logs if e["event"] == "request"]
    assert event["method"] == "GET"
    assert event["status"] == 200
    assert event["namespace"] == host(server)
    assert event["repository"] == "team/app"
    assert event["host"] == host(server)
    assert event["cache"] == "miss"
    assert event["bytes"] == len(body)
    assert event["duration_ms"] >= 0


async def test_secrets_never_reach_the_log(make_proxyd, start_fake):
    _upstream, _tokens, server, image = await behind_token_server(start_fake)
    proxyd = await make_proxyd(
        upstream_config(server, *alice(server)),
        log_level="debug",
    )
    with capture_logs() as logs:
        assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
        assert (await proxyd.get(f"/v2/team/app/blobs/{image.layer}")).status == 200
        await until_logged(proxyd)
    text = repr(logs)
    assert "wonderland" not in text
    assert "token-1" not in text
    assert "Basic " not in text and "Bearer " not in text


async def test_a_range_on_a_miss_is_206_and_the_whole_blob_is_stored(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    blob = image.blobs[image.layer]
    part = await proxyd.get(f"/v2/team/app/blobs/{image.layer}", headers={"Range": "bytes=10-19"})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(blob)}"
    assert await part.read() == blob[10:20]
    await until_stored(cache_dir, image.layer)  # the download goes on without the client
    whole = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert whole.headers["X-Proxyd-Cache"] == "hit"
    assert await whole.read() == blob
    assert len(upstream.requests(f"/blobs/{image.layer}")) == 1


async def test_a_range_is_served_from_a_download_in_flight_before_it_ends(make_proxyd, start_fake):
    upstream = FakeRegistry(gate=asyncio.Event())
    image = upstream.add(make_image(layer=bytes(range(256)) * 4000))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    blob = image.blobs[image.layer]
    whole = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")  # held before its last byte
    part = await proxyd.get(f"/v2/team/app/blobs/{image.layer}", headers={"Range": "bytes=100-199"})
    assert part.status == 206
    # All but the range's last byte before the blob ends; that one waits for the digest.
    assert await asyncio.wait_for(part.content.readexactly(99), 5) == blob[100:199]
    assert upstream.gate is not None
    upstream.gate.set()
    assert await part.read() == blob[199:200]
    assert await whole.read() == blob
    assert len(upstream.requests(f"/blobs/{image.layer}")) == 1


async def test_a_range_to_the_end_of_a_corrupt_blob_is_cut_short(make_proxyd, start_fake):
    upstream = FakeRegistry(corrupt=True)
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    part = await proxyd.get(f"/v2/team/app/blobs/{image.layer}", headers={"Range": "bytes=100-"})
    assert part.status == 206
    with pytest.raises(aiohttp.ClientPayloadError):
        await part.read()


async def test_a_range_short_of_the_end_of_a_corrupt_blob_is_cut_short_too(make_proxyd, start_fake):
    """Holding back the blob's last byte protects only the ranges that include it: a
    range that stops before it must wait for the digest as well."""
    upstream = FakeRegistry(corrupt=True)  # the first byte is wrong
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(upstream_config(server))
    size = len(image.blobs[image.layer])
    for span in (f"0-{size - 2}", "0-0"):
        part = await proxyd.get(
            f"/v2/team/app/blobs/{image.layer}", headers={"Range": f"bytes={span}"}
        )
        assert part.status == 206
        with pytest.raises(aiohttp.ClientPayloadError):
            await part.read()


async def test_every_answer_names_its_request_streamed_blobs_included(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    proxyd = await make_proxyd(upstream_config(await start_fake(upstream)))
    for path in (
        f"/v2/team/app/blobs/{image.layer}",  # a miss: streamed from the download
        f"/v2/team/app/blobs/{image.layer}",  # a hit: a file response
        "/v2/team/app/manifests/v1",
        "/v2/team/app/manifests/nope",  # an error
    ):
        response = await proxyd.get(path, headers={"X-Request-Id": "trace-7"})
        await response.read()
        assert response.headers.get("X-Request-Id") == "trace-7", path
        generated = await proxyd.get(path)
        await generated.read()
        assert len(generated.headers.get("X-Request-Id", "")) == 16, path
