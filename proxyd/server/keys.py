"""Typed application and request state."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxyd.config import Registry
from proxyd.fetch import Puller
from proxyd.metrics import Metrics
from proxyd.reload import Reloader

REGISTRY = web.AppKey("registry", Registry)
PULLER = web.AppKey("puller", Puller)
METRICS = web.AppKey("metrics", Metrics)
RELOADER = web.AppKey("reloader", Reloader)


@dataclass
class Access:
    """What the access log says of a request, filled in by the handler."""

    route: str = "other"  # the API area, a metrics label: base, manifests, blobs, tags
    namespace: str | None = None
    repository: str | None = None
    host: str | None = None
    cache: str | None = None
    aborted: bool = False  # a stream cut short after its headers were sent
    sent: int | None = None  # body bytes of a stream; else the response's Content-Length
    request_id: str = ""
    rejected: str | None = None  # why aiohttp's parser refused it, before routing


ACCESS = web.RequestKey("access", Access)
