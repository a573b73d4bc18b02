"""Typed application and request state."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxyd.fleet import Fleet
from proxyd.inbound import InboundAuth
from proxyd.metrics import Metrics
from proxyd.puller import Puller
from proxyd.push import Pusher
from proxyd.reload import Reloader
from proxyd.resolver import Resolver
from proxyd.runtime import RuntimeConfig
from proxyd.uploader import Uploader

RUNTIME = web.AppKey("runtime", RuntimeConfig)
PULLER = web.AppKey("puller", Puller)
RESOLVER = web.AppKey("resolver", Resolver)
METRICS = web.AppKey("metrics", Metrics)
RELOADER = web.AppKey("reloader", Reloader)
PUSHER = web.AppKey("pusher", Pusher)
UPLOADER = web.AppKey("uploader", Uploader)
INBOUND = web.AppKey("inbound", InboundAuth)  # only where proxyd has users of its own
FLEET = web.AppKey("fleet", Fleet)  # only with [cluster]


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
USER = web.RequestKey("user", str)  # the inbound user who authenticated, if one did
