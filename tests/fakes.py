"""In-process registries for what a real one will not do on demand: corrupt bytes,
chosen status codes, hangs, redirects, odd token servers. Each records the requests
it received so tests can assert on what crossed the wire: only the requests of the
test that started it (tests/strays.py), whatever else reaches its port."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from tests.strays import only_ours

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]


@dataclass
class FakeImage:
    repository: str
    tag: str
    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def layer(self) -> str:
        return next(d for d in self.blobs if d != self.config)

    @property
    def config(self) -> str:
        return json.loads(self.manifest)["config"]["digest"]


def make_image(repository: str = "team/app", tag: str = "v1", layer: bytes = b"") -> FakeImage:
    layer = layer or b"layer-bytes-" * 1000 + repository.encode()
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest_of(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    return FakeImage(
        repository, tag, manifest, {digest_of(config): config, digest_of(layer): layer}
    )


@dataclass
class FakeRegistry:
    """A registry serving a few images, with knobs for misbehaviour."""

    images: list[FakeImage] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    status: int | None = None  # answer every API request with this status
    hang: bool = False  # never answer API requests
    corrupt: bool = False  # flip a byte of every blob
    basic: tuple[str, str] | None = None  # require Basic credentials
    bearer_realm: str | None = None  # require tokens from this realm
    valid_tokens: set[str] = field(default_factory=set)
    redirect_blobs_to: str | None = None  # 307 blob GETs to this base URL
    retry_after: str | None = None
    drop_after: int | None = None  # cut a blob body after this many bytes
    gate: asyncio.Event | None = None  # blob bodies wait for this before the last byte
    drip: tuple[int, float] | None = None  # bodies go out (chunk size, delay) at a time
    redirect_loop: bool = False  # API requests are 307'd back to themselves, forever
    corrupt_manifests: bool = False  # flip a byte of manifest bodies (digest header kept)
    drop_manifests_after: int | None = None  # cut manifest bodies after this many bytes
    # Failures for a while, as containerd's retry rules (core/remotes/docker/resolver.go,
    # retryRequest and doWithTransportRetries) expect of registries:
    script: list[int] = field(default_factory=list)  # answer the next API requests so
    # (one status each, with `retry_after` when set), then serve normally
    disconnect_first: int = 0  # close these many API requests' connections unanswered
    no_manifest_head: bool = False  # 405 to HEAD of a manifest (resolver.go: "registries
    # which have not properly implemented the HEAD method for manifests endpoint")
    pull_limit: int | None = None  # Docker Hub's pull limit: see `_hub_limit`
    pulls: int = 0  # manifest GETs counted against pull_limit
    pad_manifests: int = 0  # append this many spaces to manifest bodies (a huge manifest)
    chunked_manifests: bool = False  # send manifest bodies without a Content-Length
    chunked_blobs: bool = False  # blob bodies in HTTP/1.1 chunks (RFC 9112 7.1), no length
    claims_every_blob: bool = False  # 200 to a HEAD of any blob, held or not (a lying mirror)

    def add(self, image: FakeImage) -> FakeImage:
        self.images.append(image)
        return image

    def requests(self, kind: str = "") -> list[Seen]:
        return [s for s in self.seen if kind in s.path]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[only_ours])
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def _authorized(self, request: web.Request) -> web.Response | None:
        given = request.headers.get("Authorization", "")
        if self.basic is not None:
            expected = "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()
            if given != expected:
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "basic auth"}]},
                    status=401,
                    headers={"WWW-Authenticate": 'Basic realm="fake"'},
                )
        if self.bearer_realm is not None and given.removeprefix("Bearer ") not in self.valid_tokens:
            repo = request.path.removeprefix("/v2/").rsplit("/", 2)[0]
            challenge = (
                f'Bearer realm="{self.bearer_realm}",service="fake",scope="repository:{repo}:pull"'
            )
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]},
                status=401,
                headers={"WWW-Authenticate": challenge},
            )
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path, dict(request.query), request.headers))
        if self.hang:
            await asyncio.sleep(3600)
        if self.redirect_loop and request.path != "/v2/":
            raise web.HTTPTemporaryRedirect(request.path_qs)
        status = self.status
        if status is None and self.script and request.path != "/v2/":
            status = self.script.pop(0)
        if status is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response(
                {"errors": [{"code": "UNKNOWN", "message": "told to fail"}]},
                status=status,
                headers=headers,
            )
        if self.disconnect_first and request.path != "/v2/":
            self.disconnect_first -= 1
            assert request.transport is not None
            request.transport.abort()  # the client sees the connection closed unanswered
            return web.Response()
        if request.path == "/v2/":
            return self._authorized(request) or web.json_response({})
        denied = self._authorized(request)
        if denied is not None:
            return denied
        rest = request.path.removeprefix("/v2/")
        for image in self.images:
            if rest == f"{image.repository}/tags/list":
                tags = sorted(i.tag for i in self.images if i.repository == image.repository)
                return web.json_response({"name": image.repository, "tags": tags})
            for reference in (image.tag, image.digest):
                if rest == f"{image.repository}/manifests/{reference}":
                    if self.no_manifest_head and request.method == "HEAD":
                        return web.Response(status=405)
                    limited, limit_headers = self._hub_limit(request)
                    if limited is not None:
                        return limited
                    if self._odd_manifests:
                        return await self._manifest(request, image, limit_headers)
                    return web.Response(
                        body=image.manifest,
                        headers={
                            "Content-Type": OCI_MANIFEST,
                            "Docker-Content-Digest": image.digest,
                            **limit_headers,
                        },
                    )
            for digest, blob in image.blobs.items():
                if rest == f"{image.repository}/blobs/{digest}":
                    return await self._blob(request, blob)
        if self.claims_every_blob and request.method == "HEAD" and "/blobs/" in rest:
            return web.Response(headers={"Content-Length": "12000"})
        code = "MANIFEST_UNKNOWN" if "/manifests/" in rest else "BLOB_UNKNOWN"
        return web.json_response({"errors": [{"code": code, "message": "not here"}]}, status=404)

    async def _blob(self, request: web.Request, blob: bytes) -> web.StreamResponse:
        if self.redirect_blobs_to and request.method == "GET":
            raise web.HTTPTemporaryRedirect(f"{self.redirect_blobs_to}{request.path}")
        headers = {
            "Docker-Content-Digest": digest_of(blob),
            "Content-Type": "application/octet-stream",
        }
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(blob))})
        if self.corrupt:
            blob = bytes([blob[0] ^ 0xFF]) + blob[1:]
        response = web.StreamResponse(headers=headers)
        if self.chunked_blobs:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(blob)
        await response.prepare(request)
        if self.drop_after is not None:
            await response.write(blob[: self.drop_after])
            assert request.transport is not None
            request.transport.abort()
            return response
        await self._write(response, blob[:-1])
        if self.gate is not None:
            await self.gate.wait()
        await response.write(blob[-1:])
        await response.write_eof()
        return response

    def _hub_limit(self, request: web.Request) -> tuple[web.Response | None, dict[str, str]]:
        """Docker Hub's pull limit, as https://docs.docker.com/docker-hub/usage/pulls/
        describes it: a pull is a GET of a manifest (HEAD requests are not counted);
        over the limit, Hub answers a manifest GET 429 ("You have reached your pull rate
        limit"); manifest answers carry `ratelimit-limit: 100;w=21600` and
        `ratelimit-remaining: N;w=21600`, on GET and HEAD alike. Blobs are never
        limited. (None, no headers) without a `pull_limit`."""
        if self.pull_limit is None:
            return None, {}
        over = request.method == "GET" and self.pulls >= self.pull_limit
        if request.method == "GET" and not over:
            self.pulls += 1
        headers = {
            "RateLimit-Limit": f"{self.pull_limit};w=21600",
            "RateLimit-Remaining": f"{self.pull_limit - self.pulls};w=21600",
        }
        if not over:
            return None, headers
        if self.retry_after:
            headers["Retry-After"] = self.retry_after
        message = "You have reached your pull rate limit."
        refusal = web.json_response(
            {"errors": [{"code": "TOOMANYREQUESTS", "message": message}]},
            status=429,
            headers=headers,
        )
        return refusal, headers

    @property
    def _odd_manifests(self) -> bool:
        return bool(
            self.drip
            or self.corrupt_manifests
            or self.drop_manifests_after is not None
            or self.pad_manifests
            or self.chunked_manifests
        )

    async def _manifest(
        self, request: web.Request, image: FakeImage, extra: dict[str, str]
    ) -> web.StreamResponse:
        """A manifest sent by the misbehaviour knobs: dripped, corrupted, cut short,
        padded, chunked."""
        body = image.manifest + b" " * self.pad_manifests
        if self.corrupt_manifests:
            body = body[:-2] + bytes([body[-2] ^ 0x01]) + body[-1:]
        digest = digest_of(body) if self.pad_manifests else image.digest
        response = web.StreamResponse(
            headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest, **extra}
        )
        if not self.chunked_manifests:
            response.content_length = len(body)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        if self.drop_manifests_after is not None:
            await response.write(body[: self.drop_manifests_after])
            assert request.transport is not None
            request.transport.abort()
            return response
        await self._write(response, body)
        await response.write_eof()
        return response

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        """All of `data`, or (with `drip`) one chunk at a time with a pause between."""
        if self.drip is None:
            await response.write(data)
            return
        size, delay = self.drip
        for start in range(0, len(data), size):
            if start:
                await asyncio.sleep(delay)
            await response.write(data[start : start + size])


@dataclass
class FakeTokenServer:
    """Hands out tokens for a FakeRegistry; `mode` picks its (mis)behaviour."""

    registry: FakeRegistry
    users: dict[str, str] = field(default_factory=lambda: {"alice": "wonderland"})
    mode: str = "ok"  # ok | no-token | post-unsupported | refuse
    seen: list[Seen] = field(default_factory=list)
    issued: int = 0
    expires_in: Any = 300  # what it says of its tokens' lifetime, sane or not

    def app(self) -> web.Application:
        app = web.Application(middlewares=[only_ours])
        app.router.add_route("*", "/token", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        form: dict[str, Any] = dict(await request.post()) if request.method == "POST" else {}
        self.seen.append(
            Seen(request.method, request.path, {**request.query, **form}, request.headers)
        )
        if self.mode == "refuse":
            return web.json_response({"details": "bad credentials"}, status=401)
        if request.method == "POST":
            if self.mode == "post-unsupported":
                return web.Response(status=404)
            if self.users.get(str(form.get("username"))) != form.get("password"):
                return web.json_response({"error": "invalid_grant"}, status=401)
        else:
            auth = request.headers.get("Authorization", "")
            if auth:
                user, _, password = (
                    base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
                )
                if self.users.get(user) != password:
                    return web.json_response({"details": "bad credentials"}, status=401)
        if self.mode == "no-token":
            return web.json_response({"expires_in": 300})
        self.issued += 1
        token = f"token-{self.issued}"
        self.registry.valid_tokens.add(token)
        return web.json_response({"token": token, "expires_in": self.expires_in})


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass(frozen=True)
class FakeList:
    """A tag's manifest list (or index) and the platform manifests it names."""

    media_type: str
    body: bytes
    amd64: bytes  # the linux/amd64 manifest (Docker schema 2)

    @property
    def digest(self) -> str:
        return digest_of(self.body)

    @property
    def amd64_digest(self) -> str:
        return digest_of(self.amd64)


def make_list(media_type: str = DOCKER_LIST, seed: str = "1") -> FakeList:
    """A list of two Docker schema 2 manifests, linux/amd64 and linux/arm64."""
    platforms = {}
    for arch in ("amd64", "arm64"):
        platforms[arch] = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "digest": digest_of(f"config {arch} {seed}".encode()),
                    "size": 10,
                },
                "layers": [],
            }
        ).encode()
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {
                    "mediaType": DOCKER_MANIFEST,
                    "digest": digest_of(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for arch, manifest in platforms.items()
            ],
        }
    ).encode()
    return FakeList(media_type, body, platforms["amd64"])


@dataclass
class NegotiatingRegistry:
    """Tags of `team/app` holding manifest lists, answered as distribution 2.8 answers
    them (registry/handlers/manifests.go, GetManifest): the list itself to an Accept
    that names its type (by exact name: distribution reads no wildcards, no q); a
    Docker list's linux/amd64 manifest to one naming schema 2 but not lists; and
    404 MANIFEST_UNKNOWN otherwise (distribution would make schema 1; not here)."""

    tags: dict[str, FakeList] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    status: int | None = None  # answer every manifest request with this status
    gate: asyncio.Event | None = None  # manifest GETs wait for it before answering

    def app(self) -> web.Application:
        app = web.Application(middlewares=[only_ours])
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def requests(self, method: str = "") -> list[Seen]:
        return [s for s in self.seen if "/manifests/" in s.path and s.method.startswith(method)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path, dict(request.query), request.headers))
        if request.path == "/v2/":
            return web.json_response({})
        if self.status is not None:
            return web.json_response({"errors": [{"code": "UNKNOWN"}]}, status=self.status)
        if self.gate is not None and request.method == "GET":
            await self.gate.wait()
        reference = request.path.removeprefix("/v2/team/app/manifests/")
        accepted = {
            item.split(";")[0].strip()
            for value in request.headers.getall("Accept", [])
            for item in value.split(",")
        }
        chosen = self._answer(reference, accepted)
        if chosen is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        media_type, body = chosen
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest_of(body)}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        return web.Response(body=body, headers=headers)

    def _answer(self, reference: str, accepted: set[str]) -> tuple[str, bytes] | None:
        listed = self.tags.get(reference)
        if listed is None:
            by_digest = {d: t for t in self.tags.values() for d in (t.digest, t.amd64_digest)}
            found = by_digest.get(reference)
            if found is None:
                return None
            if reference == found.amd64_digest:
                return DOCKER_MANIFEST, found.amd64
            return found.media_type, found.body
        if listed.media_type in accepted:
            return listed.media_type, listed.body
        if listed.media_type == DOCKER_LIST and DOCKER_MANIFEST in accepted:
            return DOCKER_MANIFEST, listed.amd64
        return None
