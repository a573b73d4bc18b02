"""The blob storage a registry redirects blob requests to: another host, reached by a
URL the registry signed for that one request, which refuses the registry's
credentials. Docker Hub, ghcr and ECR all hand blobs out this way.

Two shapes of signed URL, each from where it was seen:

- `s3`: an S3 presigned URL (query `X-Amz-Algorithm`, `X-Amz-Credential`, `X-Amz-Date`,
  `X-Amz-Expires`, `X-Amz-SignedHeaders`, `X-Amz-Signature`), as distribution's
  s3-aws driver makes them (registry/storage/driver/s3-aws/s3.go, `RedirectURL`:
  presigned for GET or for HEAD, 20 minutes), ECR's layers come from
  (GetDownloadUrlForLayer: "the pre-signed Amazon S3 download URL",
  docs.aws.amazon.com/AmazonECR/latest/APIReference/API_GetDownloadUrlForLayer.html),
  and Docker Hub's anonymous pulls reach on Cloudflare R2, an S3-compatible store
  (docs.docker.com/desktop/setup/allow-list/: docker-images-prod.<id>.r2.cloudflarestorage.com).
  The object path is distribution's layout (registry/storage/paths.go:
  docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data).
- `azure`: an Azure blob SAS URL (query `se`, `sig`, `sp=r`, `spr`, `sr=b`,
  `sv=2019-12-12`), the shape of ghcr's blob redirects to
  pkg-containers.githubusercontent.com/ghcr1/blobs/sha256:<hex> as Homebrew's download
  logs show them; `sig` is base64, so percent-encoded in the URL (`%2B`, `%2F`, `%3D`).

The real signatures are SigV4 and Azure's HMAC; here an HMAC-SHA256 with a secret of
the storage's own over the method (S3: presigned per method; SAS `sp=r` reads, by GET
or HEAD), the path and the query's other parameters stands in for both: a URL changed
on the way, or asked with another method, is refused. Every SAS signature is made to
hold a `+` and a `/` (its expiry moved on by seconds until it does), the characters a
client that decoded the `Location` before sending it would damage.

Refusals, with their sources:

- a request carrying `Authorization`: S3's 400 `InvalidArgument`, "Only one auth
  mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string
  parameter or the Authorization header should be specified" (renovatebot/renovate#3877,
  open-policy-agent/opa#6728). What Azure answers a SAS request that also carries
  `Authorization` was not found; the zoo refuses it alike, as a registry's credentials
  must not reach the storage either way.
- a signature that does not match: 403 `SignatureDoesNotMatch`; past its expiry: 403
  `AccessDenied`, "Request has expired" (S3's error codes).
- `refuse_headers`: headers this storage must never see (a test puts the names of the
  headers configured for the registry there): 403, so a client that leaks them fails.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote, urlencode

from aiohttp import web

from tests.peers.httpserver import RecordedRequest, RequestLog, record

Style = Literal["s3", "azure"]
S3_EXPIRES = 1200  # seconds: the s3-aws driver's 20 minutes
SAS_EXPIRES = 300  # seconds: ghcr's "expires soon (300sec?)", stargz-snapshotter#167
ONE_AUTH = (
    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature "
    "query string parameter or the Authorization header should be specified"
)


class SignedStorage:
    """Blobs by digest, served to whoever holds a URL `signed_url` made. `origin` is
    set when the server is started."""

    def __init__(self, style: Style, *, refuse_headers: Iterable[str] = ()) -> None:
        self.style = style
        self.refuse_headers = {name.lower() for name in refuse_headers}
        self.requests = RequestLog()
        self.origin = ""
        self.served: list[str] = []  # the paths of objects sent whole, in order
        self._objects: dict[str, bytes] = {}  # path -> bytes
        self._secret = secrets.token_bytes(32)

    def put(self, digest: str, data: bytes) -> None:
        self._objects[self.path_of(digest)] = data

    def recorded(self) -> list[RecordedRequest]:
        return self.requests.snapshot()

    def signed_url(self, method: str, digest: str) -> str:
        """A URL for `method` of the blob, valid from now for the style's lifetime."""
        path = self.path_of(digest)
        query = self._s3_query(method, path) if self.style == "s3" else self._sas_query(path)
        return f"{self.origin}{path}?{urlencode(query, quote_via=quote, safe='')}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # -- signing ------------------------------------------------------------------------------

    def path_of(self, digest: str) -> str:
        """Where the blob `digest` lives in this storage."""
        hexdigest = digest.removeprefix("sha256:")
        if self.style == "s3":
            return f"/docker/registry/v2/blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"
        return f"/ghcr1/blobs/sha256:{hexdigest}"

    def _sign(self, *parts: str) -> bytes:
        return hmac.new(self._secret, "\n".join(parts).encode(), hashlib.sha256).digest()

    def _s3_query(self, method: str, path: str) -> list[tuple[str, str]]:
        now = datetime.now(UTC)
        query = [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Credential", f"ZOOKEY/{now:%Y%m%d}/auto/s3/aws4_request"),
            ("X-Amz-Date", f"{now:%Y%m%dT%H%M%SZ}"),
            ("X-Amz-Expires", str(S3_EXPIRES)),
            ("X-Amz-SignedHeaders", "host"),
        ]
        signature = self._sign(method, path, *(f"{k}={v}" for k, v in query)).hex()
        return [*query, ("X-Amz-Signature", signature)]

    def _sas_query(self, path: str) -> list[tuple[str, str]]:
        expiry = int(time.time()) + SAS_EXPIRES
        while True:
            se = datetime.fromtimestamp(expiry, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            fields = [("se", se), ("sp", "r"), ("spr", "https"), ("sr", "b"), ("sv", "2019-12-12")]
            sig = base64.b64encode(self._sign("r", path, *(f"{k}={v}" for k, v in fields)))
            if b"+" in sig and b"/" in sig:
                return [fields[0], ("sig", sig.decode()), *fields[1:]]
            expiry += 1

    # -- serving ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await record(request, self.requests)
        if "Authorization" in request.headers:
            return _s3_error(400, "InvalidArgument", ONE_AUTH)
        leaked = sorted(self.refuse_headers & {name.lower() for name in request.headers})
        if leaked:
            return _s3_error(403, "AccessDenied", f"headers this storage must not see: {leaked}")
        refused = self._check(request)
        if refused is not None:
            return refused
        data = self._objects.get(request.path)
        if data is None:
            return _s3_error(404, "NoSuchKey", request.path)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        self.served.append(request.path)
        return web.Response(body=data, content_type="application/octet-stream")

    def _check(self, request: web.Request) -> web.Response | None:
        """The signature and expiry of the URL as it arrived (query values decoded, as a
        server reads them)."""
        query = request.query
        if self.style == "s3":
            names = (
                "X-Amz-Algorithm",
                "X-Amz-Credential",
                "X-Amz-Date",
                "X-Amz-Expires",
                "X-Amz-SignedHeaders",
            )
            signed = (f"{name}={query.get(name, '')}" for name in names)
            expected = self._sign(request.method, request.path, *signed).hex()
            given = query.get("X-Amz-Signature", "")
            try:
                issued = datetime.strptime(query.get("X-Amz-Date", ""), "%Y%m%dT%H%M%SZ")
                ends = issued.replace(tzinfo=UTC).timestamp() + int(query["X-Amz-Expires"])
            except (KeyError, ValueError):
                ends = 0.0
        else:
            if request.method not in ("GET", "HEAD") or query.get("sp") != "r":
                return _s3_error(403, "AuthorizationPermissionMismatch", "reads only")
            fields = ("se", "sp", "spr", "sr", "sv")
            signed = (f"{name}={query.get(name, '')}" for name in fields)
            expected = base64.b64encode(self._sign("r", request.path, *signed)).decode()
            given = query.get("sig", "")
            try:
                expiry = datetime.strptime(query["se"], "%Y-%m-%dT%H:%M:%SZ")
                ends = expiry.replace(tzinfo=UTC).timestamp()
            except (KeyError, ValueError):
                ends = 0.0
        if not hmac.compare_digest(expected, given):
            return _s3_error(403, "SignatureDoesNotMatch", "the URL is not the one signed")
        if time.time() > ends:
            return _s3_error(403, "AccessDenied", "Request has expired")
        return None


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")
