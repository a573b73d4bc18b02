"""Cross-cutting concerns: a request id on every log event, one access-log event per
request, and every error rendered in the OCI error format."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from proxyd.errors import EndpointUnknown, ProxydError, Unsupported
from proxyd.server.keys import ACCESS, Access

log = structlog.get_logger("proxyd.access")
API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: ProxydError) -> web.Response:
    return web.json_response(
        error.body(), status=error.status, headers={**API_VERSION_HEADER, **error.headers}
    )


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-Id", "")[:64] or secrets.token_hex(8)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    access = request[ACCESS] = Access()
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await oci_errors(request, handler)
        status = response.status
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response
    finally:
        log.info(
            "request",
            method=request.method,
            path=request.path,
            namespace=access.namespace,
            repository=access.repository,
            host=access.host,
            status=status,
            bytes=response.body_length if response is not None else 0,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            cache=access.cache,
        )


async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OCI error body; a bug becomes a 500 without a traceback
    on the wire (the log has it)."""
    try:
        return await handler(request)
    except ProxydError as error:
        log.info("request.error", code=error.code, status=error.status, message=error.message)
        return error_response(error)
    except web.HTTPMethodNotAllowed:
        return error_response(Unsupported(f"{request.method} is not supported on {request.path}"))
    except web.HTTPNotFound:
        return error_response(EndpointUnknown(f"no such endpoint {request.path}"))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("request.failed")
        return error_response(ProxydError("internal error; the log of proxyd has the details"))
