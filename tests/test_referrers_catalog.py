"""Referrers (OCI 1.1), with the tag-schema fallback, and the catalog."""

from __future__ import annotations

import hashlib
import json

from aiohttp import web

from tests.conftest import host, origin

SUBJECT = "sha256:" + "a" * 64
SIGNATURE = {
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": "sha256:" + "b" * 64,
    "size": 10,
    "artifactType": "application/vnd.dev.cosign.signature",
}
SBOM = {**SIGNATURE, "digest": "sha256:" + "c" * 64, "artifactType": "application/spdx+json"}
INDEX = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [SIGNATURE, SBOM],
}


def registry(seen: list[str], *, referrers_api: bool, tag_schema: bool = True) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        path = request.path
        if path == f"/v2/team/app/referrers/{SUBJECT}" and referrers_api:
            return web.json_response(INDEX, content_type="application/vnd.oci.image.index.v1+json")
        if path == f"/v2/team/app/manifests/sha256-{'a' * 64}" and tag_schema:
            body = json.dumps(INDEX).encode()
            return web.Response(
                body=body,
                content_type="application/vnd.oci.image.index.v1+json",
                headers={"Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()},
            )
        if path == "/v2/_catalog":
            return web.json_response(
                {"repositories": ["team/app", "team/web"]},
                headers={"Link": '</v2/_catalog?last=team%2Fweb&n=2>; rel="next"'},
            )
        return web.json_response({"errors": [{"code": "NOT_FOUND"}]}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def config(server: object) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
        ]
    )


async def test_referrers_are_passed_on_and_cached(make_proxyd, aiohttp_server):
    seen: list[str] = []
    server = await aiohttp_server(registry(seen, referrers_api=True), host="127.0.0.1")
    proxyd = await make_proxyd(config(server))
    for expected in ("miss", "hit"):
        response = await proxyd.get(f"/v2/team/app/referrers/{SUBJECT}")
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
        assert response.headers["X-Proxyd-Cache"] == expected
        assert await response.json() == INDEX
    assert seen == [f"/v2/team/app/referrers/{SUBJECT}"]


async def test_the_artifact_type_filter_is_applied(make_proxyd, aiohttp_server):
    seen: list[str] = []
    server = await aiohttp_server(registry(seen, referrers_api=True), host="127.0.0.1")
    proxyd = await make_proxyd(config(server))
    response = await proxyd.get(
        f"/v2/team/app/referrers/{SUBJECT}",
        params={"artifactType": "application/spdx+json"},
    )
    assert (await response.json())["manifests"] == [SBOM]
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    assert "artifactType=application" in seen[0]


async def test_without_the_referrers_api_the_tag_schema_answers(make_proxyd, aiohttp_server):
    seen: list[str] = []
    server = await aiohttp_server(registry(seen, referrers_api=False), host="127.0.0.1")
    proxyd = await make_proxyd(config(server))
    response = await proxyd.get(
        f"/v2/team/app/referrers/{SUBJECT}",
        params={"artifactType": "application/vnd.dev.cosign.signature"},
    )
    assert response.status == 200
    assert (await response.json())["manifests"] == [SIGNATURE]
    assert seen[-1] == f"/v2/team/app/manifests/sha256-{'a' * 64}"


async def test_no_referrers_at_all_is_an_empty_index(make_proxyd, aiohttp_server):
    seen: list[str] = []
    server = await aiohttp_server(
        registry(seen, referrers_api=False, tag_schema=False), host="127.0.0.1"
    )
    proxyd = await make_proxyd(config(server))
    response = await proxyd.get(f"/v2/team/app/referrers/{SUBJECT}")
    assert response.status == 200
    assert (await response.json())["manifests"] == []


async def test_the_referrers_api_goes_only_to_hosts_with_the_referrers_capability(
    make_proxyd, aiohttp_server
):
    """containerd 2.x's `referrers` capability (hosts.toml): a mirror listing only
    pull and resolve is not asked; one listing referrers is, before the server."""
    seen_plain: list[str] = []
    seen_referring: list[str] = []
    seen_server: list[str] = []
    plain = await aiohttp_server(registry(seen_plain, referrers_api=True), host="127.0.0.1")
    referring = await aiohttp_server(registry(seen_referring, referrers_api=True), host="127.0.0.1")
    server = await aiohttp_server(registry(seen_server, referrers_api=True), host="127.0.0.1")
    proxyd = await make_proxyd(
        "\n".join(
            [
                config(server),
                f'[namespaces."{host(server)}".host."{origin(plain)}"]',
                'capabilities = ["pull", "resolve"]',
                f'[namespaces."{host(server)}".host."{origin(referring)}"]',
                'capabilities = ["pull", "referrers"]',
            ]
        )
    )
    response = await proxyd.get(f"/v2/team/app/referrers/{SUBJECT}")
    assert response.status == 200
    assert await response.json() == INDEX
    assert seen_plain == []
    # ns= names the namespace to a mirror (containerd's isProxy)
    assert seen_referring == [f"/v2/team/app/referrers/{SUBJECT}?ns={host(server)}"]
    assert seen_server == []


async def test_without_a_referrers_host_only_the_tag_schema_is_asked_of_resolve_hosts(
    make_proxyd, aiohttp_server
):
    """A chain written for containerd 1.x (capabilities without referrers): as
    containerd 2.x, no referrers API call; the tag schema, from the resolve hosts."""
    seen: list[str] = []
    server = await aiohttp_server(registry(seen, referrers_api=True), host="127.0.0.1")
    proxyd = await make_proxyd(config(server) + '\ncapabilities = ["pull", "resolve", "push"]')
    response = await proxyd.get(f"/v2/team/app/referrers/{SUBJECT}")
    assert response.status == 200
    assert await response.json() == INDEX
    assert seen == [f"/v2/team/app/manifests/sha256-{'a' * 64}"]


async def test_the_catalog_is_forwarded_with_its_pagination(make_proxyd, aiohttp_server):
    seen: list[str] = []
    server = await aiohttp_server(registry(seen, referrers_api=True), host="127.0.0.1")
    proxyd = await make_proxyd(config(server))
    response = await proxyd.get("/v2/_catalog", params={"n": "2"})
    assert response.status == 200
    assert (await response.json())["repositories"] == ["team/app", "team/web"]
    assert response.headers["Link"] == '</v2/_catalog?last=team%2Fweb&n=2>; rel="next"'
    assert seen == ["/v2/_catalog?n=2"]


async def test_pagination_links_point_back_at_proxyd_and_keep_the_clients_ns(
    make_proxyd, aiohttp_server
):
    seen: list[str] = []
    server = await aiohttp_server(registry(seen, referrers_api=True), host="127.0.0.1")
    proxyd = await make_proxyd(config(server))
    response = await proxyd.get("/v2/_catalog", params={"n": "2", "ns": host(server)})
    assert response.headers["Link"] == (
        f'</v2/_catalog?last=team%2Fweb&n=2&ns={host(server).replace(":", "%3A")}>; rel="next"'
    )
    assert "ns=" not in seen[-1]
