"""What every registry of the zoo serves alike: distribution's pull API over a few
images, every request recorded, errors in the OCI format. What makes each registry
itself (who may ask, what it adds to an answer, where blob bytes come from) is its
subclass's, in the module named after it.

The shared behaviour is distribution's, from its spec (docs/content/spec/api.md) and
source (registry/handlers/app.go, registry/storage/blobserver.go):

- `GET /v2/` answers 200 with `Docker-Distribution-Api-Version: registry/2.0`, or the
  registry's challenge;
- `GET` and `HEAD` of `/v2/<name>/manifests/<tag or digest>` answer the manifest with
  its `Content-Type`, `Docker-Content-Digest` and `Content-Length` (HEAD: no body);
- `GET` and `HEAD` of `/v2/<name>/blobs/<digest>` answer the blob, or, where the
  storage redirects, a 307 to a URL signed for that very method (blobserver.go's
  `http.StatusTemporaryRedirect`; the s3-aws driver's `RedirectURL` presigns GET and
  HEAD apart);
- what the registry does not hold is a 404 `MANIFEST_UNKNOWN` or `BLOB_UNKNOWN`.

The repository name is everything between `/v2/` and `/manifests/` (or `/blobs/`), so
a registry served under a path below `/v2/` (a Harbor project) names its repositories
with that path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from tests.peers.httpserver import RecordedRequest, RequestLog, record
from tests.peers.image import BuiltImage, sha256_digest
from tests.zoo.storage import SignedStorage

API_VERSION = {"Docker-Distribution-Api-Version": "registry/2.0"}
_API_PATH = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")


@dataclass(frozen=True)
class Asked:
    """What a request asks of the registry: `kind` is "base" (`/v2/`), "manifests" or
    "blobs"; `repository` and `reference` are empty for the base."""

    kind: str
    repository: str = ""
    reference: str = ""


def parse(path: str) -> Asked | None:
    if path in ("/v2", "/v2/"):
        return Asked("base")
    match = _API_PATH.fullmatch(path)
    if match is None:
        return None
    return Asked(match["kind"], match["name"], match["reference"])


def oci_error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """An error as distribution writes it: `{"errors": [{"code", "message"}]}`."""
    return web.json_response(
        {"errors": [{"code": code, "message": message}]},
        status=status,
        headers={**API_VERSION, **(headers or {})},
    )


def bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer …` header, if the request sent one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


class Registry:
    """distribution's pull API over the images `add`ed. `origin` is set when the
    server is started (tests/zoo/conftest.py's `serve`)."""

    def __init__(self, *, storage: SignedStorage | None = None) -> None:
        self.storage = storage
        self.requests = RequestLog()
        self.origin = ""
        self._manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self._blobs: dict[tuple[str, str], bytes] = {}

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`: the host proxyd keys credentials by."""
        return self.origin.removeprefix("http://")

    def add(self, repository: str, image: BuiltImage, tag: str | None = None) -> None:
        """Serve `image` as `repository:tag` (and by its digest)."""
        for reference in (tag or image.tag, image.manifest_digest):
            self._manifests[(repository, reference)] = (image.manifest, image.manifest_media_type)
        for digest in image.blob_digests:
            blob = image.blob(digest)
            self._blobs[(repository, digest)] = blob
            if self.storage is not None:
                self.storage.put(digest, blob)

    def recorded(self, kind: str = "", method: str | None = None) -> list[RecordedRequest]:
        """The requests received, optionally those of one kind (`manifests`, `blobs`)
        and method, in order."""
        return [
            r
            for r in self.requests.snapshot()
            if (not kind or f"/{kind}/" in r.path) and method in (None, r.method)
        ]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # -- what each registry does its own way ----------------------------------------------

    def refuse(self, request: web.Request, asked: Asked) -> web.StreamResponse | None:
        """Why this request is not answered (authentication, limits); None lets it
        through."""
        return None

    def manifest_headers(self, request: web.Request, asked: Asked) -> dict[str, str]:
        """Headers a manifest answer carries besides distribution's."""
        return {}

    # -- distribution's answers --------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await record(request, self.requests)
        asked = parse(request.path)
        if asked is None or request.method not in ("GET", "HEAD"):
            return oci_error(404, "UNSUPPORTED", "the zoo serves pulls only")
        refused = self.refuse(request, asked)
        if refused is not None:
            return refused
        if asked.kind == "base":
            return web.json_response({}, headers=API_VERSION)
        if asked.kind == "manifests":
            return self._manifest(request, asked)
        return self._blob(request, asked)

    def _manifest(self, request: web.Request, asked: Asked) -> web.Response:
        found = self._manifests.get((asked.repository, asked.reference))
        if found is None:
            return oci_error(404, "MANIFEST_UNKNOWN", f"{asked.repository}:{asked.reference}")
        body, media_type = found
        headers = {
            **API_VERSION,
            "Content-Type": media_type,
            "Docker-Content-Digest": sha256_digest(body),
            **self.manifest_headers(request, asked),
        }
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        return web.Response(body=body, headers=headers)

    def _blob(self, request: web.Request, asked: Asked) -> web.Response:
        blob = self._blobs.get((asked.repository, asked.reference))
        if blob is None:
            return oci_error(404, "BLOB_UNKNOWN", asked.reference)
        if self.storage is not None:
            location = self.storage.signed_url(request.method, asked.reference)
            return web.Response(status=307, headers={**API_VERSION, "Location": location})
        headers = {
            **API_VERSION,
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": asked.reference,
        }
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(blob))})
        return web.Response(body=blob, headers=headers)
