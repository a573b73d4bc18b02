"""Request handlers of the `/v2/` pull API: parse, call the resolver (tags, lists) or
the puller (content by digest), render."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlencode, urlsplit

import structlog
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy

from proxyd.download import Download, OnDisk
from proxyd.errors import (
    ManifestUnknown,
    PreconditionFailed,
    TagInvalid,
    Unsupported,
    UpstreamError,
)
from proxyd.hosts import Target
from proxyd.manifests import OCI_INDEX, Manifest
from proxyd.puller import BlobHead, Joined, StoredBlob
from proxyd.ranges import content_range, parse_range
from proxyd.reference import ApiPath, Digest, Endpoint, is_digest, parse_api_path, validate_tag
from proxyd.routing import namespace_for, route
from proxyd.server import push
from proxyd.server.fastpath import FAST
from proxyd.server.keys import ACCESS, PULLER, RESOLVER, RUNTIME
from proxyd.server.middleware import API_VERSION_HEADER

log = structlog.get_logger("proxyd.server")

CACHE_HEADER = "X-Proxyd-Cache"
_BLOB_CHUNK = 256 * 1024


async def base(request: web.Request) -> web.Response:
    """`GET /v2/`: the API version check every client starts with."""
    request[ACCESS].route = "base"
    return web.json_response({}, headers=API_VERSION_HEADER)


async def api(request: web.Request) -> web.StreamResponse:
    path = parse_api_path(request.path)
    target = route(request.app[RUNTIME], path.name, request.query.get("ns"))
    access = request[ACCESS]
    access.route = path.endpoint.value
    access.namespace = target.namespace.name
    access.repository = target.repository
    if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD) or path.endpoint is Endpoint.UPLOADS:
        return await push.handle(request, target, path)
    if path.endpoint is Endpoint.MANIFEST:
        return await manifest(request, target, path)
    if path.endpoint is Endpoint.BLOB:
        return await blob(request, target, path.digest)
    if path.endpoint is Endpoint.TAGS:
        return await tags(request, target, path)
    if path.endpoint is Endpoint.REFERRERS:
        return await referrers(request, target, path.digest)
    raise Unsupported(f"proxyd does not serve {path.endpoint.value} yet")


async def referrers(request: web.Request, target: Target, digest: Digest) -> web.Response:
    artifact_type = request.query.get("artifactType")
    result = await request.app[RESOLVER].referrers(target, digest, artifact_type)
    _note(request, result.host, result.cache)
    headers = {
        **API_VERSION_HEADER,
        hdrs.CONTENT_TYPE: OCI_INDEX,
        CACHE_HEADER: result.cache,
        **({"OCI-Filters-Applied": "artifactType"} if artifact_type else {}),
    }
    return web.Response(body=json.dumps(result.body).encode(), headers=headers)


async def catalog(request: web.Request) -> web.Response:
    """`/v2/_catalog`, forwarded to the namespace's upstream where it allows it."""
    namespace = namespace_for(request.app[RUNTIME], request.query.get("ns"))
    access = request[ACCESS]
    access.route, access.namespace = "catalog", namespace.name
    params = {k: request.query[k] for k in ("n", "last") if k in request.query}
    result = await request.app[RESOLVER].catalog(namespace, params)
    _note(request, result.host, result.cache)
    headers = dict(API_VERSION_HEADER)
    if result.link:
        headers["Link"] = _client_link(result.link, "/v2/_catalog", request.query.get("ns"))
    return web.json_response(result.body, headers=headers)


async def manifest(request: web.Request, target: Target, path: ApiPath) -> web.Response:
    """A tag is the resolver's (a trusted act); a digest the puller's (verified)."""
    reference = path.reference
    accept = request.headers.getall(hdrs.ACCEPT, [])
    result: Manifest
    if is_digest(reference):
        result = await request.app[PULLER].manifest(target, Digest.parse(reference), accept)
    else:
        result = await request.app[RESOLVER].tag(target, _pulled_tag(reference), accept)
    _note(request, result.host, result.cache)
    headers = {
        **API_VERSION_HEADER,
        hdrs.CONTENT_TYPE: result.media_type,
        "Docker-Content-Digest": str(result.digest),
        hdrs.ETAG: f'"{result.digest}"',
        CACHE_HEADER: result.cache,
    }
    if result.fresh_until is not None:
        request.app[FAST].remember(
            request.raw_path,
            request.path,
            result,
            headers,
            request[ACCESS],
            accept=None if is_digest(reference) else accept,
        )
    if request.method == hdrs.METH_HEAD:
        headers[hdrs.CONTENT_LENGTH] = str(result.size)
        return web.Response(headers=headers)
    return web.Response(body=result.body, headers=headers)


def _pulled_tag(reference: str) -> str:
    """A tag to pull. One the grammar refuses names no manifest: a 404, as the
    distribution spec requires of GET and HEAD of a manifest that is not there (a
    PUT of one keeps the 400 TAG_INVALID: there it is the client's mistake)."""
    try:
        return validate_tag(reference)
    except TagInvalid:
        raise ManifestUnknown(f"no manifest can have {reference!r}: not a valid tag") from None


async def blob(request: web.Request, target: Target, digest: Digest) -> web.StreamResponse:
    head = request.method == hdrs.METH_HEAD
    result = await request.app[PULLER].blob(target, digest, head=head)
    headers = {
        **API_VERSION_HEADER,
        hdrs.CONTENT_TYPE: "application/octet-stream",
        "Docker-Content-Digest": str(digest),
    }
    if isinstance(result, StoredBlob):
        _note(request, None, "hit")
        return await serve_stored(request, result, {**headers, CACHE_HEADER: "hit"})
    if isinstance(result, BlobHead):
        _note(request, result.host, "miss")
        if result.size is not None:
            headers[hdrs.CONTENT_LENGTH] = str(result.size)
        return web.Response(headers={**headers, hdrs.ETAG: f'"{digest}"', CACHE_HEADER: "miss"})
    if isinstance(result, Joined):
        return await stream_download(request, result.download, headers, cache="hit")
    return await stream_download(request, result, headers)


async def stream_download(
    request: web.Request, download: Download, headers: dict[str, str], cache: str = "miss"
) -> web.StreamResponse:
    _note(request, None if cache == "hit" else download.host, cache)
    response = web.StreamResponse(
        headers={**headers, hdrs.ETAG: f'"{download.digest}"', CACHE_HEADER: cache}
    )
    start, stop = 0, download.size
    if download.size is not None:
        span = parse_range(request.headers.get(hdrs.RANGE), download.size)
        if span is not None:  # served from the download in flight as the bytes arrive
            start, stop = span[0], span[1] + 1
            response.set_status(206)
            response.headers[hdrs.CONTENT_RANGE] = content_range(*span, download.size)
        response.content_length = stop - start if stop is not None else None
    await response.prepare(request)
    access = request[ACCESS]
    access.sent = 0
    transport = request.transport
    try:
        if transport is None:
            raise ConnectionResetError("the client went away")
        # sendfile: a plain socket, and a body of a known length (no chunks to frame).
        spans = transport.get_extra_info("sslcontext") is None and not response.chunked
        spans = spans and response.content_length is not None
        async with contextlib.aclosing(download.pieces(start, stop, spans=spans)) as pieces:
            async for piece in pieces:
                if isinstance(piece, OnDisk):
                    await _send_span(transport, piece)
                    access.sent += piece.length
                else:
                    await response.write(piece)
                    access.sent += len(piece)
    except Exception as exc:
        # Headers are out: the only honest signal left is to cut the connection.
        log.warning("blob.aborted", digest=str(download.digest), error=str(exc))
        access.aborted = True
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


async def _send_span(transport: asyncio.Transport, span: OnDisk) -> None:
    """A span of the download's file, with sendfile (the loop waits for the socket)."""
    sent = await asyncio.get_running_loop().sendfile(transport, span.file, span.offset, span.length)
    if sent != span.length:  # the file is shorter than the disk's count: never spin on it
        raise UpstreamError(f"sent {sent} of {span.length} bytes at {span.offset}")


_CONDITIONAL = (
    hdrs.RANGE,
    hdrs.IF_RANGE,
    hdrs.IF_MATCH,
    hdrs.IF_NONE_MATCH,
    hdrs.IF_MODIFIED_SINCE,
    hdrs.IF_UNMODIFIED_SINCE,
)


async def serve_stored(
    request: web.Request, blob: StoredBlob, headers: dict[str, str]
) -> web.StreamResponse:
    """A stored blob with sendfile. Conditions and Range are judged here against the
    digest ETag (aiohttp's FileResponse would use its own mtime-size ETag); the file
    response then sees only the one normalised range to send."""
    etag = f'"{blob.digest}"'
    if _etag_matches(request.headers.getall(hdrs.IF_NONE_MATCH, []), etag):
        return web.Response(status=304, headers={**API_VERSION_HEADER, hdrs.ETAG: etag})
    if_match = request.headers.getall(hdrs.IF_MATCH, [])
    if if_match and not _etag_matches(if_match, etag):
        raise PreconditionFailed(f"If-Match does not match {etag}")
    span = None
    if_range = request.headers.get(hdrs.IF_RANGE)
    if if_range is None or _etag_matches([if_range], etag):
        span = parse_range(request.headers.get(hdrs.RANGE), blob.size)
    plain = CIMultiDict(request.headers)
    for name in _CONDITIONAL:
        plain.popall(name, None)
    if span is not None:
        plain[hdrs.RANGE] = f"bytes={span[0]}-{span[1]}"
    return BlobFileResponse(blob, headers, request.clone(headers=CIMultiDictProxy(plain)))


def _etag_matches(values: list[str], etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2); `*` matches any current representation."""
    tags = {t.strip().removeprefix("W/") for value in values for t in value.split(",")}
    return "*" in tags or etag in tags


class BlobFileResponse(web.FileResponse):
    """A stored blob, sent with sendfile; the ETag is the digest, as registries send."""

    def __init__(self, blob: StoredBlob, headers: dict[str, str], plain: web.Request) -> None:
        super().__init__(blob.path, chunk_size=_BLOB_CHUNK, headers=headers)
        self._digest_etag = f'"{blob.digest}"'
        self._plain = plain  # the request with conditions already judged, one range at most

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:  # FileResponse would judge the original request's headers again
            return await web.StreamResponse.prepare(self, request)
        return await super().prepare(self._plain)

    @property
    def etag(self) -> Any:
        return self._digest_etag

    @etag.setter
    def etag(self, value: Any) -> None:
        self.headers[hdrs.ETAG] = self._digest_etag


async def tags(request: web.Request, target: Target, path: ApiPath) -> web.Response:
    params = {k: request.query[k] for k in ("n", "last") if k in request.query}
    result = await request.app[RESOLVER].tags(target, params)
    _note(request, result.host, result.cache)
    body = {**result.body, "name": path.name}
    headers = {**API_VERSION_HEADER, CACHE_HEADER: result.cache}
    if result.link:
        headers["Link"] = _client_link(
            result.link, f"/v2/{path.name}/tags/list", request.query.get("ns")
        )
    if request.method == hdrs.METH_HEAD:
        return web.Response(headers={**headers, hdrs.CONTENT_TYPE: "application/json"})
    return web.json_response(body, headers=headers, dumps=json.dumps)


def _client_link(link: str, path: str, ns: str | None) -> str:
    """Point an upstream pagination Link back at proxyd's `path` (the client's name),
    keeping the upstream's query and the client's `ns`."""
    url = link.split(";", 1)[0].strip().strip("<>")
    query = urlsplit(url).query
    if ns:
        query = f"{query}&{urlencode({'ns': ns})}" if query else urlencode({"ns": ns})
    return f'<{path}{"?" + query if query else ""}>; rel="next"'


def _note(request: web.Request, host: str | None, cache: str) -> None:
    access = request[ACCESS]
    access.host = host
    access.cache = cache
