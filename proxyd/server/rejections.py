"""Requests aiohttp refuses before routing: one OCI 400, one access line, one count.

A request line or header aiohttp's parser cannot read, bytes that are not HTTP at
all, a TLS handshake sent to a plain-HTTP port (podman and skopeo probe an insecure
registry with one before falling back to http): aiohttp answers these itself, outside
the app and its middlewares, with a text 400 and a traceback in the log. Here each
is a `MalformedRequest` in the OCI error format with a request id of its own, one
access line naming the parser's reason (`rejected`), and one count in the metrics
under the route `rejected`; the connection then closes, as aiohttp closes it (a
stream it could not read has no next request to find).
"""

from __future__ import annotations

from typing import Any, Self

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxyd.errors import MalformedRequest
from proxyd.server.keys import ACCESS, Access
from proxyd.server.middleware import error_response, new_request_id

REJECTED = "rejected"  # the route label and access-log flag of such requests


class RejectingRequestHandler(RequestHandler):
    """aiohttp's connection protocol, answering requests its parser refused as proxyd
    answers every error."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)  # a handler's failure
        reason = _reason(message or exc.message)
        request_id = new_request_id()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        request[ACCESS] = Access(route=REJECTED, request_id=request_id, rejected=reason)
        response = error_response(MalformedRequest(f"proxyd cannot read this request: {reason}"))
        response.headers["X-Request-Id"] = request_id  # no app: no on_response_prepare
        response.force_close()
        return response


def _reason(message: str) -> str:
    """The first line of the parser's message, without the bytes it quotes."""
    first = message.strip().splitlines()[0] if message.strip() else "unreadable request"
    return first.rstrip(": ")


class RejectingServer(web.Server):
    """aiohttp's Server, making connections that answer refused requests as above."""

    @classmethod
    def adopting(cls, server: web.Server, **extra: Any) -> Self:
        """The same server as the one aiohttp's runner built, with these connections."""
        return cls(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **extra,
            **server._kwargs,
        )

    def __call__(self) -> RequestHandler:
        return RejectingRequestHandler(self, loop=self._loop, **self._kwargs)
