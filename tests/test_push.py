"""Pushes through proxyd, in one process: proxyd's app in front of a fake registry
that takes uploads the way distribution does (a signed `_state` in every location,
only the latest valid), so the tests see exactly what crossed the wire."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxyd.config import ConfigError, load_settings
from proxyd.errors import BlobUploadInvalid, Unauthorized
from proxyd.hosts import Capability
from proxyd.runtime import build_runtime
from proxyd.server.keys import UPLOADER
from proxyd.uploads import confirmed_offset, parse_content_range, upstream_suffix
from proxyd.upstream import UpstreamClient
from tests.conftest import FakeClock, host, origin, until
from tests.fakes import FakeTokenServer, digest_of, make_image
from tests.strays import only_ours

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    size: int  # body bytes


@dataclass
class _Upload:
    repository: str
    data: bytearray = field(default_factory=bytearray)
    state: str = field(default_factory=lambda: secrets.token_hex(4))


@dataclass
class UploadRegistry:
    """A registry that takes pushes: uploads (chunked, streamed, monolithic),
    cross-repository mounts, manifests, deletes; and serves what it holds."""

    blobs: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> digest -> bytes
    manifests: dict[str, dict[str, tuple[str, bytes]]] = field(default_factory=dict)
    uploads: dict[str, _Upload] = field(default_factory=dict)
    seen: list[Received] = field(default_factory=list)
    absolute_locations: bool = False
    # Object storage (the distribution spec allows it): uploads go on at this other
    # host:port (the same registry served there too), which asks for no credentials.
    storage_host: str | None = None
    bearer_realm: str | None = None
    valid_tokens: set[str] = field(default_factory=set)
    first_patch_bytes: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20, middlewares=[only_ours])
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def requests(self, method: str = "", kind: str = "") -> list[Received]:
        return [r for r in self.seen if r.method.startswith(method) and kind in r.path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        size = 0
        chunks = bytearray()
        async for chunk in request.content.iter_any():
            if request.method == "PATCH":
                self.first_patch_bytes.set()
            chunks += chunk
            size += len(chunk)
        body = bytes(chunks)
        self.seen.append(
            Received(request.method, request.path, dict(request.query), request.headers, size)
        )
        at_storage = self.storage_host is not None and request.host == self.storage_host
        if self.bearer_realm is not None and not at_storage:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in self.valid_tokens:
                return _error(
                    401,
                    "UNAUTHORIZED",
                    headers={
                        "WWW-Authenticate": f'Bearer realm="{self.bearer_realm}",service="up"'
                    },
                )
        if request.path == "/v2/":
            return web.json_response({})
        rest = request.path.removeprefix("/v2/").removeprefix("/storage/")
        if match := re.fullmatch(r"(.+)/blobs/uploads/", rest):
            return self._start(request, match[1])
        if match := re.fullmatch(r"(.+)/blobs/uploads/([^/]+)", rest):
            return self._continue(request, match[1], match[2], body)
        if match := re.fullmatch(r"(.+)/blobs/([^/]+)", rest):
            return self._blob(request, match[1], match[2])
        if match := re.fullmatch(r"(.+)/manifests/([^/]+)", rest):
            return self._manifest(request, match[1], match[2], body)
        if match := re.fullmatch(r"(.+)/tags/list", rest):
            return self._tags(match[1])
        if match := re.fullmatch(r"(.+)/referrers/([^/]+)", rest):
            return self._referrers(match[1], match[2])
        return _error(404, "UNSUPPORTED")

    def _tags(self, repository: str) -> web.Response:
        stored = self.manifests.get(repository, {})
        tags = sorted(r for r in stored if not r.startswith("sha256:"))
        return web.json_response({"name": repository, "tags": tags})

    def _referrers(self, repository: str, subject: str) -> web.Response:
        """The OCI 1.1 referrers API: the manifests whose `subject` is `subject`."""
        found = []
        for reference, (media_type, body) in self.manifests.get(repository, {}).items():
            document = json.loads(body)
            if (
                reference.startswith("sha256:")
                and document.get("subject", {}).get("digest") == subject
            ):
                found.append(
                    {
                        "mediaType": media_type,
                        "digest": reference,
                        "size": len(body),
                        "artifactType": document.get("artifactType"),
                    }
                )
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return web.json_response(index, content_type=OCI_INDEX)

    def _location(self, repository: str, uuid: str) -> str:
        query = f"?_state={self.uploads[uuid].state}%3D"
        if self.storage_host is not None:
            return f"http://{self.storage_host}/storage/{repository}/blobs/uploads/{uuid}{query}"
        path = f"/v2/{repository}/blobs/uploads/{uuid}{query}"
        return f"http://{self.host}{path}" if self.absolute_locations else path

    host = ""  # set once served

    def _progress(self, repository: str, uuid: str, status: int) -> web.Response:
        upload = self.uploads[uuid]
        upload.state = secrets.token_hex(4)
        return web.Response(
            status=status,
            headers={
                "Location": self._location(repository, uuid),
                "Range": f"0-{max(len(upload.data) - 1, 0)}",
                "Docker-Upload-UUID": uuid,
            },
        )

    def _start(self, request: web.Request, repository: str) -> web.Response:
        mount, source = request.query.get("mount"), request.query.get("from")
        if mount and source and mount in self.blobs.get(source, {}):
            self.blobs.setdefault(repository, {})[mount] = self.blobs[source][mount]
            return web.Response(status=201, headers={"Docker-Content-Digest": mount})
        uuid = secrets.token_hex(8)
        self.uploads[uuid] = _Upload(repository)
        return self._progress(repository, uuid, 202)

    def _continue(
        self, request: web.Request, repository: str, uuid: str, body: bytes
    ) -> web.Response:
        upload = self.uploads.get(uuid)
        if upload is None or upload.repository != repository:
            return _error(404, "BLOB_UPLOAD_UNKNOWN")
        if request.query.get("_state") != upload.state + "=":
            return _error(400, "BLOB_UPLOAD_INVALID", "stale _state")
        if request.method == "GET":
            return self._progress(repository, uuid, 204)
        if request.method == "DELETE":
            del self.uploads[uuid]
            return web.Response(status=204)
        if "Content-Range" in request.headers:
            start = int(request.headers["Content-Range"].split("-")[0])
            if start != len(upload.data):
                return _error(416, "BLOB_UPLOAD_INVALID", "out of order")
        upload.data += body
        if request.method == "PATCH":
            return self._progress(repository, uuid, 202)
        digest = request.query.get("digest", "")
        del self.uploads[uuid]
        if digest_of(bytes(upload.data)) != digest:
            return _error(400, "DIGEST_INVALID", "digest does not match")
        self.blobs.setdefault(repository, {})[digest] = bytes(upload.data)
        return web.Response(
            status=201,
            headers={
                "Docker-Content-Digest": digest,
                "Location": f"/v2/{repository}/blobs/{digest}",
            },
        )

    def _blob(self, request: web.Request, repository: str, digest: str) -> web.Response:
        blob = self.blobs.get(repository, {}).get(digest)
        if request.method == "DELETE":
            if blob is None:
                return _error(404, "BLOB_UNKNOWN")
            del self.blobs[repository][digest]
            return web.Response(status=202)
        if blob is None:
            return _error(404, "BLOB_UNKNOWN")
        headers = {"Docker-Content-Digest": digest, "Content-Length": str(len(blob))}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        return web.Response(body=blob, headers={"Docker-Content-Digest": digest})

    def _manifest(
        self, request: web.Request, repository: str, reference: str, body: bytes
    ) -> web.Response:
        stored = self.manifests.setdefault(repository, {})
        if request.method == "PUT":
            document = json.loads(body)
            wanted = [
                document["config"]["digest"],
                *(layer["digest"] for layer in document["layers"]),
            ]
            missing = [d for d in wanted if d not in self.blobs.get(repository, {})]
            if missing:
                return _error(400, "MANIFEST_BLOB_UNKNOWN", f"blob unknown: {missing[0]}")
            digest = digest_of(body)
            media_type = request.headers.get("Content-Type", "")
            stored[reference] = stored[digest] = (media_type, body)
            return web.Response(status=201, headers={"Docker-Content-Digest": digest})
        if request.method == "DELETE":
            deleted = stored.pop(reference, None)
            if deleted is None:
                return _error(404, "MANIFEST_UNKNOWN")
            if reference.startswith("sha256:"):  # its tags go with it, as in distribution
                for tag in [t for t, held in stored.items() if held == deleted]:
                    del stored[tag]
            return web.Response(status=202)
        if reference not in stored:
            return _error(404, "MANIFEST_UNKNOWN")
        media_type, manifest = stored[reference]
        return web.Response(
            body=manifest,
            headers={"Content-Type": media_type, "Docker-Content-Digest": digest_of(manifest)},
        )


def _error(
    status: int, code: str, message: str = "", headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"errors": [{"code": code, "message": message or code.lower()}]},
        status=status,
        headers=headers,
    )


def push_config(server: object, *extra: str, allow_push: bool = True) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
            f"allow_push = {'true' if allow_push else 'false'}",
            *extra,
        ]
    )


async def serve(start_fake: Any, registry: UploadRegistry) -> Any:
    server = await start_fake(registry)
    registry.host = host(server)
    return server


def errors(body: dict[str, Any]) -> tuple[str, str]:
    error = body["errors"][0]
    return error["code"], error["message"]


LAYER = bytes(range(256)) * 400  # 100 KiB


async def start(proxyd: Any, name: str = "team/app", **params: str) -> aiohttp.ClientResponse:
    response: aiohttp.ClientResponse = await proxyd.post(
        f"/v2/{name}/blobs/uploads/", params=params
    )
    return response


# -- policy -------------------------------------------------------------------------------


async def test_pushes_are_refused_unless_the_namespace_allows_them(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server, allow_push=False))
    for method, path in [
        ("POST", "/v2/team/app/blobs/uploads/"),
        ("PUT", "/v2/team/app/manifests/v1"),
        ("PATCH", "/v2/team/app/blobs/uploads/" + "a" * 32),
    ]:
        response = await proxyd.request(method, path, data=b"{}")
        assert response.status == 405, path
        code, message = errors(await response.json())
        assert code == "UNSUPPORTED"
        if method != "PATCH":
            assert f"pushes to {host(server)} are not allowed; set allow_push" in message
    assert upstream.seen == []


async def test_allow_push_comes_from_the_flag_the_environment_or_the_namespace(
    tmp_path, monkeypatch
):
    assert load_settings(None, allow_push=["ghcr.io", "quay.io"]).allow_push == [
        "ghcr.io",
        "quay.io",
    ]
    monkeypatch.setenv("PROXYD_ALLOW_PUSH", '["docker.io"]')
    assert load_settings(None).allow_push == ["docker.io"]
    monkeypatch.setenv("PROXYD_ALLOW_PUSH", "docker.io, ghcr.io")
    assert load_settings(None).allow_push == ["docker.io", "ghcr.io"]
    monkeypatch.setenv("PROXYD_ALLOW_PUSH", "not a host")
    with pytest.raises(ConfigError, match="allow_push"):
        load_settings(None)
    monkeypatch.delenv("PROXYD_ALLOW_PUSH")
    config = tmp_path / "proxyd.toml"
    config.write_text('[namespaces."ghcr.io"]\nallow_push = true\nallow_delete = true\n')
    registry = build_runtime(load_settings(config))
    ghcr, hub = registry.namespace("ghcr.io"), registry.namespace("docker.io")
    assert ghcr is not None and hub is not None
    assert registry.push_allowed(ghcr) and ghcr.allow_delete
    assert not registry.push_allowed(hub) and not hub.allow_delete


async def test_a_namespace_without_a_push_capable_host_refuses_pushes(make_proxyd, start_fake):
    server_side, mirror_side = UploadRegistry(), UploadRegistry()
    server = await serve(start_fake, server_side)
    mirror = await serve(start_fake, mirror_side)
    proxyd = await make_proxyd(
        push_config(
            server,
            'capabilities = ["pull", "resolve"]',
            f'[namespaces."{host(server)}".host."{origin(mirror)}"]',
            'capabilities = ["pull", "resolve", "push"]',
        )
    )
    response = await start(proxyd)
    assert response.status == 405
    code, message = errors(await response.json())
    assert code == "UNSUPPORTED"
    assert repr(host(server)) in message and "push capability" in message
    assert server_side.seen == [] and mirror_side.seen == []


async def test_a_push_never_reaches_a_mirror(make_proxyd, start_fake):
    upstream, mirror_side = UploadRegistry(), UploadRegistry()
    server = await serve(start_fake, upstream)
    mirror = await serve(start_fake, mirror_side)
    proxyd = await make_proxyd(
        push_config(server, f'[namespaces."{host(server)}".host."{origin(mirror)}"]')
    )
    image = make_image()
    for digest, blob in image.blobs.items():
        started = await start(proxyd)
        assert started.status == 202, await started.text()
        done = await proxyd.put(started.headers["Location"], params={"digest": digest}, data=blob)
        assert done.status == 201
    pushed = await proxyd.put(
        "/v2/team/app/manifests/v1", data=image.manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert pushed.status == 201
    assert upstream.manifests["team/app"]["v1"][1] == image.manifest
    assert mirror_side.seen == []


# -- uploads ------------------------------------------------------------------------------


async def test_chunked_upload_answers_with_proxyds_own_locations(make_proxyd, start_fake):
    upstream = UploadRegistry(absolute_locations=True)
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))

    started = await start(proxyd)
    assert started.status == 202
    uuid = started.headers["Docker-Upload-UUID"]
    location = started.headers["Location"]
    assert location == f"/v2/team/app/blobs/uploads/{uuid}"
    assert started.headers["Range"] == "0-0"
    assert started.headers["Docker-Distribution-API-Version"] == "registry/2.0"

    chunks = [LAYER[:40000], LAYER[40000:80000], LAYER[80000:]]
    offset = 0
    for chunk in chunks:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
        }
        response = await proxyd.patch(location, data=chunk, headers=headers)
        assert response.status == 202, await response.text()
        offset += len(chunk)
        assert response.headers["Range"] == f"0-{offset - 1}"
        assert response.headers["Location"] == location
        assert response.headers["Docker-Upload-UUID"] == uuid

    digest = digest_of(LAYER)
    done = await proxyd.put(location, params={"digest": digest})
    assert done.status == 201
    assert done.headers["Location"] == f"/v2/team/app/blobs/{digest}"
    assert done.headers["Docker-Content-Digest"] == digest
    assert upstream.blobs["team/app"][digest] == LAYER
    patches = upstream.requests("PATCH")
    assert [p.size for p in patches] == [len(c) for c in chunks]
    assert [p.headers["Content-Range"] for p in patches] == [
        "0-39999",
        "40000-79999",
        "80000-102399",
    ]
    assert all("_state" in r.query for r in [*patches, *upstream.requests("PUT")])

    pulled = await proxyd.get(f"/v2/team/app/blobs/{digest}")
    assert pulled.status == 200
    assert await pulled.read() == LAYER
    assert pulled.headers["X-Proxyd-Cache"] == "hit"
    assert upstream.requests("GET", "/blobs/sha256") == []
    assert upstream.requests("HEAD") == []


async def test_a_patch_streams_upstream_as_it_arrives(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    location = (await start(proxyd)).headers["Location"]

    async def body() -> AsyncIterator[bytes]:
        yield LAYER[:50000]
        # Only once upstream has bytes does the client send the rest: a proxy that
        # read the whole body first would wait here for ever.
        await asyncio.wait_for(upstream.first_patch_bytes.wait(), 10)
        yield LAYER[50000:]

    response = await proxyd.patch(location, data=body())  # no Content-Range: a stream
    assert response.status == 202
    assert response.headers["Range"] == f"0-{len(LAYER) - 1}"
    assert "Content-Range" not in upstream.requests("PATCH")[0].headers
    done = await proxyd.put(location, params={"digest": digest_of(LAYER)})
    assert done.status == 201
    assert (await proxyd.get(f"/v2/team/app/blobs/{digest_of(LAYER)}")).headers[
        "X-Proxyd-Cache"
    ] == "hit"


async def test_status_then_resume_from_the_offset(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    location = (await start(proxyd)).headers["Location"]
    first = await proxyd.patch(location, data=LAYER[:30000], headers={"Content-Range": "0-29999"})
    assert first.status == 202

    status = await proxyd.get(location)
    assert status.status == 204
    assert status.headers["Range"] == "0-29999"
    assert status.headers["Location"] == location
    assert status.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]
    assert upstream.requests("GET", "/blobs/uploads/")  # asked upstream, not guessed

    resume_at = int(status.headers["Range"].split("-")[1]) + 1
    rest = await proxyd.patch(
        location,
        data=LAYER[resume_at:],
        headers={"Content-Range": f"{resume_at}-{len(LAYER) - 1}"},
    )
    assert rest.status == 202
    done = await proxyd.put(location, params={"digest": digest_of(LAYER)})
    assert done.status == 201
    assert upstream.blobs["team/app"][digest_of(LAYER)] == LAYER


async def test_an_out_of_order_chunk_is_416_and_the_upload_goes_on(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    location = (await start(proxyd)).headers["Location"]
    wrong = await proxyd.patch(location, data=b"abc", headers={"Content-Range": "5-7"})
    assert wrong.status == 416
    assert errors(await wrong.json())[0] == "RANGE_INVALID"
    assert upstream.requests("PATCH") == []
    right = await proxyd.patch(location, data=b"abc", headers={"Content-Range": "0-2"})
    assert right.status == 202
    assert (await proxyd.put(location, params={"digest": digest_of(b"abc")})).status == 201


async def test_cancel_removes_the_upload_here_and_upstream(make_proxyd, start_fake, cache_dir):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    location = (await start(proxyd)).headers["Location"]
    await proxyd.patch(location, data=LAYER[:1000], headers={"Content-Range": "0-999"})
    assert any((cache_dir / "tmp").iterdir())

    cancelled = await proxyd.delete(location)
    assert cancelled.status == 204
    assert upstream.uploads == {}
    assert upstream.requests("DELETE", "/blobs/uploads/")
    assert list((cache_dir / "tmp").iterdir()) == []
    again = await proxyd.patch(location, data=b"x")
    assert again.status == 404
    assert errors(await again.json())[0] == "BLOB_UPLOAD_UNKNOWN"


async def test_monolithic_uploads_post_then_put_or_one_post(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    first, second = b"first blob" * 100, b"second blob" * 100

    location = (await start(proxyd)).headers["Location"]
    put = await proxyd.put(location, params={"digest": digest_of(first)}, data=first)
    assert put.status == 201

    one_post = await proxyd.post(
        "/v2/team/app/blobs/uploads/",
        params={"digest": digest_of(second)},
        data=second,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert one_post.status == 201
    assert one_post.headers["Location"] == f"/v2/team/app/blobs/{digest_of(second)}"
    assert upstream.blobs["team/app"] == {digest_of(first): first, digest_of(second): second}
    # The registry got each blob once, in the upload's PUT (a POST's body is ignored
    # by distribution, so proxyd never sends one).
    assert [r.size for r in upstream.requests("POST")] == [0, 0]
    assert [r.size for r in upstream.requests("PUT")] == [len(first), len(second)]
    for blob in (first, second):
        served = await proxyd.get(f"/v2/team/app/blobs/{digest_of(blob)}")
        assert served.headers["X-Proxyd-Cache"] == "hit"


async def test_the_clients_ns_stays_in_every_location(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(
        push_config(server).replace(f'default_namespace = "{host(server)}"', "")
    )
    ns = {"ns": host(server)}
    started = await start(proxyd, **ns)
    assert started.status == 202
    location = started.headers["Location"]
    assert location.endswith("?" + urlencode(ns))
    patched = await proxyd.patch(location, data=b"abc")
    assert patched.headers["Location"] == location
    done = await proxyd.put(location + "&digest=" + digest_of(b"abc"))
    assert done.status == 201
    assert done.headers["Location"] == f"/v2/team/app/blobs/{digest_of(b'abc')}?{urlencode(ns)}"
    assert all("ns" not in r.query for r in upstream.seen)


async def test_a_wrong_digest_is_the_registrys_error_and_nothing_is_kept(
    make_proxyd, start_fake, cache_dir
):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    location = (await start(proxyd)).headers["Location"]
    wrong = digest_of(b"something else")
    response = await proxyd.put(location, params={"digest": wrong}, data=LAYER)
    assert response.status == 400
    code, message = errors(await response.json())
    assert code == "DIGEST_INVALID" and "digest does not match" in message
    assert not (cache_dir / "blobs" / "sha256" / wrong.split(":")[1]).exists()
    assert not (cache_dir / "blobs" / "sha256" / digest_of(LAYER).split(":")[1]).exists()
    assert list((cache_dir / "tmp").iterdir()) == []


async def test_an_upload_belongs_to_its_repository(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    uuid = (await start(proxyd)).headers["Docker-Upload-UUID"]
    elsewhere = await proxyd.patch(f"/v2/team/other/blobs/uploads/{uuid}", data=b"x")
    assert elsewhere.status == 404
    assert errors(await elsewhere.json())[0] == "BLOB_UPLOAD_UNKNOWN"
    assert upstream.requests("PATCH") == []


async def test_an_abandoned_upload_expires(make_proxyd, start_fake, cache_dir):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    clock = FakeClock()  # a pause of the test (a GC) must not expire it early
    proxyd = await make_proxyd(f"upload_ttl = 0.05\n{push_config(server)}", clock=clock)
    uploads = proxyd.server.app[UPLOADER].uploads
    location = (await start(proxyd)).headers["Location"]
    await proxyd.patch(location, data=b"abc")
    assert any((cache_dir / "tmp").iterdir())
    clock.advance(1.0)  # idle for longer than the TTL
    # The expiry task looks every ttl/4.
    await until(lambda: len(uploads) == 0 and upstream.uploads == {})
    assert len(uploads) == 0
    assert upstream.uploads == {}  # cancelled upstream too
    assert list((cache_dir / "tmp").iterdir()) == []
    gone = await proxyd.patch(location, data=b"def")
    assert gone.status == 404
    assert errors(await gone.json())[0] == "BLOB_UPLOAD_UNKNOWN"
    assert load_settings(None).upload_ttl == 3600  # by default an idle upload lives an hour


# -- cross-repository mounts --------------------------------------------------------------


async def test_a_clients_mount_is_forwarded_and_sends_no_bytes(make_proxyd, start_fake):
    upstream = UploadRegistry(blobs={"team/base": {digest_of(LAYER): LAYER}})
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    mounted = await start(proxyd, mount=digest_of(LAYER), **{"from": "team/base"})
    assert mounted.status == 201
    assert mounted.headers["Location"] == f"/v2/team/app/blobs/{digest_of(LAYER)}"
    assert upstream.requests("POST")[0].query == {"mount": digest_of(LAYER), "from": "team/base"}
    assert upstream.requests("PATCH") == [] and upstream.requests("PUT") == []
    assert upstream.blobs["team/app"][digest_of(LAYER)] == LAYER


async def test_a_mount_the_registry_cannot_do_becomes_an_upload(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    fallback = await start(proxyd, mount=digest_of(LAYER), **{"from": "team/base"})
    assert fallback.status == 202
    location = fallback.headers["Location"]
    assert location.startswith("/v2/team/app/blobs/uploads/")
    done = await proxyd.put(location, params={"digest": digest_of(LAYER)}, data=LAYER)
    assert done.status == 201


async def test_proxyd_mounts_from_a_repository_its_links_know(make_proxyd, start_fake):
    """The distribution source: proxyd pulled the blob from team/base, so a push of it
    to team/app is a mount there; the bytes the client sends go nowhere."""
    upstream = UploadRegistry(blobs={"team/base": {digest_of(LAYER): LAYER}})
    upstream.bearer_realm = "pending"
    tokens = FakeTokenServer(upstream)  # type: ignore[arg-type]
    token_server = await start_fake(tokens)
    upstream.bearer_realm = f"{origin(token_server)}/token"
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(
        push_config(
            server,
            f'[credentials."{host(server)}"]',
            'username = "alice"',
            'password = "wonderland"',
        )
    )
    pulled = await proxyd.get(f"/v2/team/base/blobs/{digest_of(LAYER)}")
    assert await pulled.read() == LAYER

    pushed = await proxyd.post(
        "/v2/team/app/blobs/uploads/", params={"digest": digest_of(LAYER)}, data=LAYER
    )
    assert pushed.status == 201
    mount = upstream.requests("POST")[-1]
    assert mount.query == {"mount": digest_of(LAYER), "from": "team/base"}
    assert upstream.requests("PATCH") == [] and upstream.requests("PUT") == []
    assert upstream.blobs["team/app"][digest_of(LAYER)] == LAYER
    scopes = [s.query.get("scope", "") for s in tokens.seen]
    assert any(
        "repository:team/base:pull" in s and "repository:team/app:pull,push" in s for s in scopes
    ), scopes


async def test_an_upload_moved_to_another_origin_is_followed_without_the_registrys_secrets(
    make_proxyd, start_fake
):
    """A registry backed by object storage starts the upload, then names a Location on
    the storage's own origin (the distribution spec allows it; containerd's pusher
    follows it with its authorizer stripped): the chunks and the end go there, with
    neither the registry's token nor its configured headers."""
    upstream = UploadRegistry()
    upstream.bearer_realm = "pending"
    tokens = FakeTokenServer(upstream)  # type: ignore[arg-type]
    upstream.bearer_realm = f"{origin(await start_fake(tokens))}/token"
    storage = await start_fake(upstream)  # the same registry, at its storage's address
    upstream.storage_host = host(storage)
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(
        push_config(
            server,
            f'[namespaces."{host(server)}".header]',
            '"X-Api-Key" = "registry-key"',
            f'[credentials."{host(server)}"]',
            'username = "alice"',
            'password = "wonderland"',
        )
    )
    started = await start(proxyd)
    assert started.status == 202, await started.text()
    location = started.headers["Location"]
    assert location.startswith("/v2/team/app/blobs/uploads/")  # proxyd's own, as ever
    patched = await proxyd.patch(
        location,
        data=LAYER[:50000],
        headers={"Content-Type": "application/octet-stream", "Content-Range": "0-49999"},
    )
    assert patched.status == 202, await patched.text()
    assert patched.headers["Range"] == "0-49999"
    status = await proxyd.get(location)
    assert status.status == 204 and status.headers["Range"] == "0-49999"
    digest = digest_of(LAYER)
    done = await proxyd.put(location, params={"digest": digest}, data=LAYER[50000:])
    assert done.status == 201, await done.text()
    assert upstream.blobs["team/app"][digest] == LAYER

    at_registry = [r for r in upstream.seen if r.headers["Host"] == host(server)]
    at_storage = [r for r in upstream.seen if r.headers["Host"] == host(storage)]
    assert [(r.method, r.path.split("/")[1]) for r in at_storage] == [
        ("PATCH", "storage"),
        ("GET", "storage"),
        ("PUT", "storage"),
    ]
    assert all("_state" in r.query for r in at_storage)
    for received in at_storage:
        assert "Authorization" not in received.headers
        assert "X-Api-Key" not in received.headers
    assert any(r.headers.get("Authorization", "").startswith("Bearer ") for r in at_registry)
    assert all(r.headers["X-Api-Key"] == "registry-key" for r in at_registry)

    pulled = await proxyd.get(f"/v2/team/app/blobs/{digest}")
    assert pulled.headers["X-Proxyd-Cache"] == "hit"  # kept on the way, as any push


async def test_an_upload_moved_to_another_origin_can_be_cancelled_there(make_proxyd, start_fake):
    upstream = UploadRegistry()
    storage = await start_fake(upstream)
    upstream.storage_host = host(storage)
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    started = await start(proxyd)
    cancelled = await proxyd.delete(started.headers["Location"])
    assert cancelled.status == 204, await cancelled.text()
    assert upstream.uploads == {}
    assert upstream.seen[-1].method == "DELETE" and upstream.seen[-1].headers["Host"] == host(
        storage
    )


# -- manifests and deletes ----------------------------------------------------------------


async def push_image(proxyd: Any, image: Any) -> aiohttp.ClientResponse:
    for digest, blob in image.blobs.items():
        started = await start(proxyd, image.repository)
        assert started.status == 202
        await proxyd.put(started.headers["Location"], params={"digest": digest}, data=blob)
    response: aiohttp.ClientResponse = await proxyd.put(
        f"/v2/{image.repository}/manifests/{image.tag}",
        data=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    return response


async def test_a_pushed_manifest_is_stored_and_served_from_the_store(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    image = make_image()
    pushed = await push_image(proxyd, image)
    assert pushed.status == 201
    assert pushed.headers["Docker-Content-Digest"] == image.digest
    assert pushed.headers["Location"] == f"/v2/team/app/manifests/{image.digest}"
    assert upstream.manifests["team/app"]["v1"] == (OCI_MANIFEST, image.manifest)

    by_digest = await proxyd.get(f"/v2/team/app/manifests/{image.digest}")
    assert await by_digest.read() == image.manifest
    assert by_digest.headers["X-Proxyd-Cache"] == "hit"
    assert by_digest.headers["Content-Type"] == OCI_MANIFEST
    assert upstream.requests("GET", "/manifests/") == []


async def test_a_manifest_is_checked_before_it_goes_upstream(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(f"max_manifest_size = 1000\n{push_config(server)}")
    image = make_image()
    wrong_digest = await proxyd.put(
        f"/v2/team/app/manifests/{digest_of(b'other')}", data=image.manifest
    )
    assert wrong_digest.status == 400
    assert errors(await wrong_digest.json())[0] == "DIGEST_INVALID"
    too_large = await proxyd.put("/v2/team/app/manifests/v1", data=b"{" + b" " * 2000 + b"}")
    assert too_large.status == 413
    assert errors(await too_large.json())[0] == "SIZE_INVALID"
    bad_tag = await proxyd.put("/v2/team/app/manifests/-v1", data=image.manifest)
    assert bad_tag.status == 400
    assert upstream.seen == []


async def test_a_manifest_naming_a_missing_blob_gets_the_registrys_error(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    image = make_image()
    response = await proxyd.put(
        "/v2/team/app/manifests/v1", data=image.manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert response.status == 400
    code, message = errors(await response.json())
    assert code == "MANIFEST_BLOB_UNKNOWN" and "blob unknown" in message


async def test_deletes_are_refused_unless_allowed_then_forwarded(make_proxyd, start_fake):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    image = make_image()
    pushing = await make_proxyd(push_config(server))
    assert (await push_image(pushing, image)).status == 201
    refused = await pushing.delete(f"/v2/team/app/manifests/{image.digest}")
    assert refused.status == 405
    assert "allow_delete" in errors(await refused.json())[1]
    assert upstream.requests("DELETE") == []

    deleting = await make_proxyd(push_config(server, "allow_delete = true"))
    await deleting.get(f"/v2/team/app/manifests/{image.digest}")  # linked in this cache
    deleted = await deleting.delete(f"/v2/team/app/manifests/{image.digest}")
    assert deleted.status == 202
    assert upstream.requests("DELETE", "/manifests/")
    gone = await deleting.get(f"/v2/team/app/manifests/{image.digest}")
    assert gone.status == 404  # no longer served from the store


# -- the upstream client's request bodies -------------------------------------------------


async def test_once_the_challenge_is_known_a_streamed_body_goes_out_once(start_fake, tmp_path):
    upstream = UploadRegistry()
    upstream.bearer_realm = "pending"
    tokens = FakeTokenServer(upstream)  # type: ignore[arg-type]
    token_server = await start_fake(tokens)
    upstream.bearer_realm = f"{origin(token_server)}/token"
    server = await serve(start_fake, upstream)
    config = tmp_path / "c.toml"
    config.write_text(push_config(server))
    registry = build_runtime(load_settings(config, cache_dir=tmp_path))
    namespace = registry.namespace(host(server))
    assert namespace is not None
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(4):
            sent += 1
            yield b"x" * 1000

    async with UpstreamClient(registry, user_agent="test") as client:
        async with client.request(
            namespace, Capability.PUSH, "POST", "team/app", "blobs/uploads/", actions="pull,push"
        ) as up:
            location = up.response.headers["Location"]
        suffix = location.split("/team/app/", 1)[1]
        async with client.request(
            namespace,
            Capability.PUSH,
            "PATCH",
            "team/app",
            suffix,
            actions="pull,push",
            data=body(),
        ) as up:
            assert up.response.status == 202
    assert sent == 4
    patches = upstream.requests("PATCH")
    assert len(patches) == 1 and patches[0].size == 4000
    assert upstream.requests("GET") == []  # the POST taught the challenge: no ping


async def test_a_streamed_body_refused_with_401_is_not_sent_again(make_proxyd, start_fake):
    upstream = UploadRegistry()
    tokens = FakeTokenServer(upstream)  # type: ignore[arg-type]
    upstream.bearer_realm = f"{origin(await start_fake(tokens))}/token"
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    location = (await start(proxyd)).headers["Location"]
    upstream.valid_tokens.clear()  # the registry forgets every token it gave

    refused = await proxyd.patch(location, data=LAYER)
    assert refused.status == 401
    assert "send the request again" in errors(await refused.json())[1]
    assert len(upstream.requests("PATCH")) == 1
    again = await proxyd.patch(location, data=LAYER)  # a fresh token now
    assert again.status == 202
    assert len(upstream.requests("PATCH")) == 2


async def test_a_streamed_body_is_not_sent_again_even_when_credentials_changed(
    start_fake, tmp_path
):
    """A refusal asks for the credentials again (`on_refused`); a request whose body
    can be sent once only still fails with the 401 rather than going once more."""
    upstream = UploadRegistry()
    tokens = FakeTokenServer(upstream)  # type: ignore[arg-type]
    upstream.bearer_realm = f"{origin(await start_fake(tokens))}/token"
    server = await serve(start_fake, upstream)
    config = tmp_path / "c.toml"
    config.write_text(push_config(server))
    registry = build_runtime(load_settings(config, cache_dir=tmp_path))
    namespace = registry.namespace(host(server))
    assert namespace is not None
    asked: list[str] = []

    async def changed(refused_host: str) -> bool:
        asked.append(refused_host)
        return True

    async def body() -> AsyncIterator[bytes]:
        yield LAYER

    async with UpstreamClient(registry, user_agent="test") as client:
        client.on_refused = changed
        async with client.request(
            namespace, Capability.PUSH, "POST", "team/app", "blobs/uploads/", actions="pull,push"
        ) as up:
            suffix = up.response.headers["Location"].split("/team/app/", 1)[1]
        upstream.valid_tokens.clear()  # the registry forgets every token it gave
        with pytest.raises(Unauthorized):
            async with client.request(
                namespace,
                Capability.PUSH,
                "PATCH",
                "team/app",
                suffix,
                actions="pull,push",
                data=body(),
            ):
                pass
    assert asked == [host(server)]
    assert len(upstream.requests("PATCH")) == 1


async def test_a_client_gone_mid_chunk_leaves_an_upload_that_can_be_resumed(
    make_proxyd, start_fake
):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    location = (await start(proxyd)).headers["Location"]
    _, writer = await asyncio.open_connection("127.0.0.1", proxyd.port)
    writer.write(
        f"PATCH {location} HTTP/1.1\r\nHost: proxyd\r\nContent-Length: {len(LAYER)}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + LAYER[:1000]
    )
    await writer.drain()
    writer.close()

    answers = []

    async def not_busy() -> bool:  # busy (400) until proxyd has seen the client go
        answers.append(await proxyd.get(location))
        return bool(answers[-1].status != 400)

    await until(not_busy)
    status = answers[-1]
    assert status.status == 204
    assert status.headers["Range"] == "0-0"  # the registry kept none of the broken chunk
    rest = await proxyd.patch(
        location, data=LAYER, headers={"Content-Range": f"0-{len(LAYER) - 1}"}
    )
    assert rest.status == 202
    done = await proxyd.put(location, params={"digest": digest_of(LAYER)})
    assert done.status == 201


async def test_a_streamed_body_to_a_fresh_host_pings_for_its_challenge_first(start_fake, tmp_path):
    upstream = UploadRegistry()
    tokens = FakeTokenServer(upstream)  # type: ignore[arg-type]
    token_server = await start_fake(tokens)
    upstream.bearer_realm = f"{origin(token_server)}/token"
    server = await serve(start_fake, upstream)
    config = tmp_path / "c.toml"
    config.write_text(push_config(server))
    registry = build_runtime(load_settings(config, cache_dir=tmp_path))
    namespace = registry.namespace(host(server))
    assert namespace is not None
    upstream.uploads["0123456789abcdef"] = _Upload("team/app", state="s")

    async def body() -> AsyncIterator[bytes]:
        yield b"y" * 100

    async with (
        UpstreamClient(registry, user_agent="test") as client,
        client.request(
            namespace,
            Capability.PUSH,
            "PATCH",
            "team/app",
            "blobs/uploads/0123456789abcdef?_state=s%3D",
            actions="pull,push",
            data=body(),
        ) as up,
    ):
        assert up.response.status == 202
    methods = [(r.method, r.path) for r in upstream.seen]
    assert methods[0] == ("GET", "/v2/")  # the ping: 401, the challenge learnt
    assert [m for m in methods if m[0] == "PATCH"] == [
        ("PATCH", "/v2/team/app/blobs/uploads/0123456789abcdef")
    ]
    assert upstream.requests("PATCH")[0].headers["Authorization"].startswith("Bearer ")


# -- pure helpers -------------------------------------------------------------------------


def test_upload_locations_are_kept_below_the_repository_with_their_query():
    from proxyd.hostsfile import HostSettings, make_host

    registry_host = make_host("http://127.0.0.1:5000", HostSettings(), is_mirror=False)
    absolute = "http://127.0.0.1:5000/v2/team/app/blobs/uploads/abc?_state=x%3D&b=1"
    assert (
        upstream_suffix(registry_host, "team/app", absolute) == "blobs/uploads/abc?_state=x%3D&b=1"
    )
    assert upstream_suffix(registry_host, "team/app", "/v2/team/app/blobs/uploads/abc") == (
        "blobs/uploads/abc"
    )
    assert upstream_suffix(registry_host, "team/app", "abc?s=1") == "blobs/uploads/abc?s=1"
    with pytest.raises(Exception, match="upload"):
        upstream_suffix(registry_host, "team/app", "/v2/team/other/blobs/uploads/abc")


def test_upload_locations_on_another_origin_are_kept_whole_with_their_query():
    from proxyd.hostsfile import HostSettings, make_host

    registry_host = make_host("http://127.0.0.1:5000", HostSettings(), is_mirror=False)
    for elsewhere in (
        "http://storage.example/upload/abc?X-Amz-Signature=a%2Fb&x=1",
        "https://127.0.0.1:5000/v2/team/app/blobs/uploads/abc",
    ):
        assert upstream_suffix(registry_host, "team/app", elsewhere) == elsewhere
    # A relative location the storage sends is read against where the upload stands.
    current = "http://storage.example/upload/abc?sig=1"
    assert upstream_suffix(registry_host, "team/app", "/upload/abc?sig=2", current) == (
        "http://storage.example/upload/abc?sig=2"
    )
    for unusable in ("ftp://storage.example/abc", "http:///abc"):
        with pytest.raises(Exception, match="upload location"):
            upstream_suffix(registry_host, "team/app", unusable)


def test_offsets_follow_the_registrys_range_with_its_zero_byte_ambiguity():
    assert confirmed_offset("0-99", 0) == 100
    assert confirmed_offset("0-0", 0) == 0
    assert confirmed_offset("0-0", 1) == 1
    assert confirmed_offset("0-0", 7) is None
    assert confirmed_offset(None, 12) == 12
    assert parse_content_range("0-9") == (0, 9)
    assert parse_content_range("bytes 10-19/*") == (10, 19)
    with pytest.raises(Exception, match="Content-Range"):
        parse_content_range("9-0")


HUGE = "9" * 5000  # past the 4,300 digits Python's int() reads


def test_a_range_of_thousands_of_digits_confirms_nothing_and_is_a_clients_400():
    assert confirmed_offset(f"0-{HUGE}", 12) == 12  # an upstream's: as if it sent none
    assert confirmed_offset(f"0-1{'0' * 18}", 12) == 12  # past an exabyte
    assert confirmed_offset(f"0-{'9' * 18}", 12) == 10**18
    for value in (f"0-{HUGE}", f"{HUGE}-{HUGE}", "0-\u0661"):
        with pytest.raises(BlobUploadInvalid, match="Content-Range"):
            parse_content_range(value)


async def test_a_chunk_with_a_content_range_of_thousands_of_digits_is_a_400(
    make_proxyd, start_fake
):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))
    location = (await start(proxyd)).headers["Location"]
    wrong = await proxyd.patch(location, data=b"abc", headers={"Content-Range": f"0-{HUGE}"})
    assert wrong.status == 400
    assert errors(await wrong.json())[0] == "BLOB_UPLOAD_INVALID"
    assert upstream.requests("PATCH") == []


def test_check_config_says_where_pushes_go(tmp_path, capsys):
    from proxyd.cli import main

    config = tmp_path / "proxyd.toml"
    config.write_text(
        '[namespaces."ghcr.io"]\nallow_push = true\nallow_delete = true\n'
        '[namespaces."quay.io"]\ncapabilities = ["pull", "resolve"]\n'
    )
    assert main(["check-config", "--config", str(config), "--allow-push", "quay.io"]) == 0
    out = capsys.readouterr().out
    assert "  pushes and deletes allowed to https://ghcr.io" in out
    assert "  pushes allowed but no host has the push capability" in out
    assert out.count("allowed") == 2  # docker.io: nothing said, pushes refused


async def test_a_tag_pushed_through_proxyd_is_not_answered_from_the_old_cache(
    make_proxyd, start_fake
):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    proxyd = await make_proxyd(push_config(server))  # tag_ttl: the default 60 s
    first, second = make_image(layer=b"first" * 100), make_image(layer=b"second" * 100)
    assert (await push_image(proxyd, first)).status == 201
    before = await proxyd.get("/v2/team/app/manifests/v1")
    assert before.headers["Docker-Content-Digest"] == first.digest
    assert (await proxyd.get("/v2/team/app/manifests/v1")).headers["X-Proxyd-Cache"] == "hit"

    assert (await push_image(proxyd, second)).status == 201
    after = await proxyd.get("/v2/team/app/manifests/v1")
    assert after.status == 200
    assert after.headers["Docker-Content-Digest"] == second.digest
    assert await after.read() == second.manifest
