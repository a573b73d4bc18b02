"""Cross-cutting concerns: a request id on every log event, one access-log event per
request, every error rendered in the OCI error format, and clients authenticated to
proxyd where `auth_required` says so."""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from proxyd.errors import EndpointUnknown, ProxydError, Unsupported
from proxyd.inbound import CHALLENGE
from proxyd.log import ACCESS_LOGGER, HOLE, AccessTemplate, json_text
from proxyd.metrics import Metrics
from proxyd.server.keys import ACCESS, INBOUND, METRICS, USER, Access

log = structlog.get_logger(ACCESS_LOGGER)
errlog = structlog.get_logger("proxyd.server")
API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: ProxydError) -> web.Response:
    return web.json_response(
        error.body(), status=error.status, headers={**API_VERSION_HEADER, **error.headers}
    )


_ID_PREFIX = secrets.token_hex(4)  # this process's; the counter keeps ids apart within it
_ids = itertools.count(1)


def new_request_id() -> str:
    """16 hex digits, unique per process run (cheaper than 8 random bytes each)."""
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFFFFFF:08x}"


# A client's X-Request-Id is echoed in the response and written in the log: only as a
# short token (UUIDs, hex, base64, W3C trace ids fit), else the request gets its own.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:=+/-]{1,64}")


def safe_request_id(header: str) -> bool:
    return _CLIENT_ID.fullmatch(header) is not None


def request_id_from(header: str | None) -> str:
    """The client's request id where it is a safe token, else a fresh one."""
    return header if header is not None and safe_request_id(header) else new_request_id()


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to every log event of the request and render errors."""
    request_id = request_id_from(request.headers.get("X-Request-Id"))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request[ACCESS] = Access(request_id=request_id)
    return await oci_errors(request, handler)


@web.middleware
async def inbound_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Clients authenticate to proxyd where `auth_required` says so. Their
    Authorization header is read here and goes nowhere else."""
    auth = request.app.get(INBOUND)
    if auth is None:
        return await handler(request)
    user = await auth.authenticate(
        request.method, request.path, request.headers.get(hdrs.AUTHORIZATION)
    )
    if user is not None:
        request[USER] = user
    response = await handler(request)
    if request.path in ("/v2", "/v2/") and not response.prepared:
        # The probe tells clients that proxyd takes Basic credentials (for pushes).
        response.headers[hdrs.WWW_AUTHENTICATE] = CHALLENGE
    return response


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response names its request, streamed ones included (their headers leave
    from inside the handler): `on_response_prepare`."""
    access = request.get(ACCESS)
    if access is not None and access.request_id:
        response.headers.setdefault("X-Request-Id", access.request_id)


class AccessLogger(AbstractAccessLogger):
    """One `request` event per request, written once the response is sent, so the
    byte count and duration are the real ones."""

    metrics: Metrics | None = None  # see `counting_into`; else the routed app's

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        access = request.get(ACCESS)
        routed = access is not None and not access.rejected  # else request.app asserts
        if access is None:
            access = Access()
        metrics = self.metrics
        if metrics is None and routed and isinstance(request, web.Request):
            metrics = request.app.get(METRICS)
        sent = access.sent if access.sent is not None else response.content_length or 0
        if request.method == "HEAD":
            sent = 0
        if metrics is not None:
            metrics.requests.labels(access.route, request.method, str(response.status)).inc()
            metrics.request_seconds.labels(access.route).observe(time)
            source = "store" if access.cache in ("hit", "stale", "revalidated") else "upstream"
            metrics.bytes_served.labels(source).inc(sent)
        path = request.path if routed else None  # aiohttp's stand-in for none is "/"
        if path in QUIET_PATHS and response.status == 200:
            return  # probes every few seconds would drown the log
        log_request(request.method, path, access, response.status, sent, time)

    @property
    def enabled(self) -> bool:
        return True


def counting_into(metrics: Metrics) -> type[AccessLogger]:
    """An AccessLogger that counts every request in `metrics`, the ones refused before
    routing included (they have no app to find the metrics in). aiohttp makes one
    logger per connection, from the class it is given."""

    class CountingAccessLogger(AccessLogger):
        pass

    CountingAccessLogger.metrics = metrics
    return CountingAccessLogger


def log_request(
    method: str, path: str | None, access: Access, status: int, sent: int, seconds: float
) -> None:
    """The access-log event; the request id comes from the context."""
    log.info("request", **_access_fields(method, path, access, status, sent, _ms(seconds)))


class AccessLine:
    """The access line of one remembered answer (the same line `log_request` writes),
    rendered once but for the request id, the duration and the time."""

    def __init__(self, method: str, path: str, access: Access, status: int, sent: int) -> None:
        self._fields = _access_fields(method, path, access, status, sent, HOLE)
        self._fields.update(event="request", request_id=HOLE)
        self._template = AccessTemplate(self._fields)

    def write(self, seconds: float, request_id: str) -> None:
        whole, tenth = divmod(_tenths_of_ms(seconds), 10)
        # the JSON of `_ms(seconds)`: tenths / 10 is written with one decimal (< 1e15)
        if not self._template.write_json(f"{whole}.{tenth}", json_text(request_id)):
            fields = {**self._fields, "duration_ms": _ms(seconds), "request_id": request_id}
            log.info(fields.pop("event"), **fields)


def _access_fields(
    method: str, path: str | None, access: Access, status: int, sent: int, duration_ms: object
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "method": method,
        "path": path,
        "namespace": access.namespace,
        "repository": access.repository,
        "host": access.host,
        "status": status,
        "bytes": sent,
        "duration_ms": duration_ms,
        "cache": access.cache,
    }
    if access.aborted:
        fields["aborted"] = True
    if access.rejected:
        fields["rejected"] = access.rejected
    return fields


def _ms(seconds: float) -> float:
    return _tenths_of_ms(seconds) / 10


def _tenths_of_ms(seconds: float) -> int:
    """Rounded half up (`round` costs several times as much, on every hit)."""
    return int(seconds * 10_000 + 0.5)


async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OCI error body; a bug becomes a 500 without a traceback
    on the wire (the log has it)."""
    try:
        return await handler(request)
    except ProxydError as error:
        errlog.info("request.error", code=error.code, status=error.status, message=error.message)
        return error_response(error)
    except web.HTTPMethodNotAllowed:
        return error_response(Unsupported(f"{request.method} is not supported on {request.path}"))
    except web.HTTPNotFound:
        return error_response(EndpointUnknown(f"no such endpoint {request.path}"))
    except web.HTTPException:
        raise
    except Exception:
        errlog.exception("request.failed")
        return error_response(ProxydError("internal error; the log of proxyd has the details"))
