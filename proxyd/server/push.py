"""Request handlers of pushes (blob uploads, manifest PUT, DELETE): parse, call the
push core, render. proxyd answers with its own upload locations
(`/v2/<name>/blobs/uploads/<uuid>`, keeping the client's `ns`), never the registry's."""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from typing import Literal
from urllib.parse import urlencode

from aiohttp import hdrs, web

from proxyd.errors import DigestInvalid, ProxydError, Unsupported
from proxyd.hosts import Target
from proxyd.reference import ApiPath, Digest, Endpoint
from proxyd.routing import route
from proxyd.server.keys import ACCESS, PUSHER, RUNTIME, UPLOADER, USER
from proxyd.server.middleware import API_VERSION_HEADER
from proxyd.uploader import Started
from proxyd.uploads import UploadSession


async def handle(request: web.Request, target: Target, path: ApiPath) -> web.StreamResponse:
    """Every `/v2/` request other than a pull."""
    method = request.method
    if path.endpoint is Endpoint.UPLOADS:
        if not path.reference:
            if method == hdrs.METH_POST:
                return await start_upload(request, target, path)
        elif method == hdrs.METH_PATCH:
            return await append(request, target, path)
        elif method == hdrs.METH_PUT:
            return await finish(request, target, path)
        elif method == hdrs.METH_GET:
            return await status(request, target, path)
        elif method == hdrs.METH_DELETE:
            return await cancel(request, target, path)
    elif path.endpoint is Endpoint.MANIFEST:
        if method == hdrs.METH_PUT:
            return await put_manifest(request, target, path)
        if method == hdrs.METH_DELETE:
            return await delete(request, target, "manifests", path.reference)
    elif path.endpoint is Endpoint.BLOB and method == hdrs.METH_DELETE:
        return await delete(request, target, "blobs", path.reference)
    raise Unsupported(f"proxyd does not accept {method} on {path.endpoint.value}")


async def start_upload(request: web.Request, target: Target, path: ApiPath) -> web.Response:
    query = request.query
    if "digest" in query and "mount" in query:
        raise Unsupported("an upload is either a mount or a blob with its digest, not both")
    mount_from = None
    if query.get("from"):
        try:
            mount_from = route(request.app[RUNTIME], query["from"], query.get("ns"))
        except ProxydError:
            mount_from = None  # not a repository proxyd knows: upstream gets no source
    started = await request.app[UPLOADER].start_upload(
        target,
        request.get(USER),
        digest=_digest(query, "digest"),
        body=_body(request),
        length=request.content_length,
        mount=_digest(query, "mount"),
        mount_from=mount_from,
    )
    return _started(request, path, started)


async def append(request: web.Request, target: Target, path: ApiPath) -> web.Response:
    session = await request.app[UPLOADER].append(
        target,
        path.reference,
        request.get(USER),
        _body(request),
        content_range=request.headers.get(hdrs.CONTENT_RANGE),
        length=request.content_length,
    )
    return _upload_response(request, path, session, 202)


async def finish(request: web.Request, target: Target, path: ApiPath) -> web.Response:
    digest = _digest(request.query, "digest")
    if digest is None:
        raise DigestInvalid("finishing an upload needs ?digest=")
    request[ACCESS].host = await request.app[UPLOADER].finish_upload(
        target,
        path.reference,
        request.get(USER),
        digest,
        _body(request),
        request.content_length,
    )
    return _created(request, path, digest)


async def status(request: web.Request, target: Target, path: ApiPath) -> web.Response:
    session = await request.app[UPLOADER].status(target, path.reference, request.get(USER))
    return _upload_response(request, path, session, 204)


async def cancel(request: web.Request, target: Target, path: ApiPath) -> web.Response:
    await request.app[UPLOADER].cancel(target, path.reference, request.get(USER))
    return web.Response(status=204, headers=API_VERSION_HEADER)


async def put_manifest(request: web.Request, target: Target, path: ApiPath) -> web.Response:
    pusher = request.app[PUSHER]
    pusher.push_host(target)  # refuse before reading the body
    body = await pusher.read_manifest(_body(request), request.content_length)
    media_type = request.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip() or None
    pushed = await pusher.put_manifest(target, path.reference, body, media_type, request.get(USER))
    request[ACCESS].host = pushed.host
    headers = {
        **API_VERSION_HEADER,
        hdrs.LOCATION: _client_path(request, path, f"manifests/{pushed.digest}"),
        "Docker-Content-Digest": str(pushed.digest),
        hdrs.CONTENT_LENGTH: "0",
    }
    if pushed.subject:
        headers["OCI-Subject"] = pushed.subject
    return web.Response(status=201, headers=headers)


async def delete(
    request: web.Request, target: Target, kind: Literal["manifests", "blobs"], reference: str
) -> web.Response:
    request[ACCESS].host = await request.app[PUSHER].delete(target, kind, reference)
    return web.Response(status=202, headers={**API_VERSION_HEADER, hdrs.CONTENT_LENGTH: "0"})


# -- rendering ---------------------------------------------------------------------------


def _started(request: web.Request, path: ApiPath, started: Started) -> web.Response:
    request[ACCESS].host = started.host
    if started.session is not None:
        return _upload_response(request, path, started.session, 202)
    assert started.digest is not None
    return _created(request, path, started.digest)


def _created(request: web.Request, path: ApiPath, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={
            **API_VERSION_HEADER,
            hdrs.LOCATION: _client_path(request, path, f"blobs/{digest}"),
            "Docker-Content-Digest": str(digest),
            hdrs.CONTENT_LENGTH: "0",
        },
    )


def _upload_response(
    request: web.Request, path: ApiPath, session: UploadSession, status: int
) -> web.Response:
    request[ACCESS].host = session.host.host
    return web.Response(
        status=status,
        headers={
            **API_VERSION_HEADER,
            hdrs.LOCATION: _client_path(request, path, f"blobs/uploads/{session.uuid}"),
            "Docker-Upload-UUID": session.uuid,
            hdrs.RANGE: session.range_header,
            hdrs.CONTENT_LENGTH: "0",
        },
    )


def _client_path(request: web.Request, path: ApiPath, suffix: str) -> str:
    """A path below the client's own name, keeping its `ns` (containerd's mirror mode)."""
    ns = request.query.get("ns")
    return f"/v2/{path.name}/{suffix}" + (f"?{urlencode({'ns': ns})}" if ns else "")


# -- parsing -------------------------------------------------------------------------------


def _digest(query: Mapping[str, str], name: str) -> Digest | None:
    value = query.get(name)
    return Digest.parse(value) if value else None


def _body(request: web.Request) -> AsyncIterable[bytes] | None:
    """The request body as it arrives (never buffered whole), or None."""
    return request.content.iter_any() if request.body_exists else None
