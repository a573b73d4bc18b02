"""Every error proxyd reports, each mapped to one OCI error code and HTTP status.

ProxydError                      (500 UNKNOWN)
├── RequestError                 the client asked for something malformed
│   ├── NameInvalid              400 NAME_INVALID
│   ├── TagInvalid               400 TAG_INVALID
│   ├── DigestInvalid            400 DIGEST_INVALID
│   ├── RangeNotSatisfiable      416 RANGE_INVALID
│   ├── PreconditionFailed       412 PRECONDITION_FAILED
│   ├── BlobUploadInvalid        400 BLOB_UPLOAD_INVALID (a chunk or upload proxyd cannot take)
│   ├── ManifestInvalid          400 MANIFEST_INVALID
│   ├── ManifestBlobUnknown      400 MANIFEST_BLOB_UNKNOWN (a pushed manifest names a missing blob)
│   ├── SizeInvalid              400 SIZE_INVALID
│   ├── MalformedRequest         400 UNSUPPORTED (not HTTP proxyd can read: refused before
│                                    routing, as a TLS handshake on a plain-HTTP port)
│   └── Unsupported              405 UNSUPPORTED (method or API proxyd does not serve, a
│                                    push proxyd does not allow)
├── NotFound
│   ├── EndpointUnknown          404 UNSUPPORTED (no such API endpoint)
│   ├── NameUnknown              404 NAME_UNKNOWN (namespace or repository)
│   ├── ManifestUnknown          404 MANIFEST_UNKNOWN
│   ├── BlobUnknown              404 BLOB_UNKNOWN
│   └── BlobUploadUnknown        404 BLOB_UPLOAD_UNKNOWN (no such upload, or it expired)
├── Unauthorized                 401 UNAUTHORIZED (upstream refused proxyd's credentials;
│                                    or a client's to proxyd, with a Basic challenge)
├── Denied                       403 DENIED
├── TooManyRequests              429 TOOMANYREQUESTS (carries Retry-After)
├── ManifestTooLarge             413 SIZE_INVALID
├── Offline                      503 UNAVAILABLE (offline, and nothing cached)
├── Overloaded                   503 UNAVAILABLE (max_connections reached: a connection
│                                    refused before its request is read)
└── UpstreamError                502 UNAVAILABLE: no host of the chain could answer
    ├── NoCapableHost            502 UNAVAILABLE: the chain has no host for the request
    ├── TokenError               502 UNAVAILABLE: a token server failed or sent no token
    └── DigestMismatch           502 DIGEST_INVALID: upstream bytes do not match
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class ProxydError(Exception):
    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


class RequestError(ProxydError):
    status = 400


class NameInvalid(RequestError):
    code = "NAME_INVALID"


class TagInvalid(RequestError):
    code = "TAG_INVALID"


class DigestInvalid(RequestError):
    code = "DIGEST_INVALID"


class RangeNotSatisfiable(RequestError):
    code = "RANGE_INVALID"
    status = 416


class PreconditionFailed(RequestError):
    code = "PRECONDITION_FAILED"
    status = 412


class BlobUploadInvalid(RequestError):
    code = "BLOB_UPLOAD_INVALID"


class ManifestInvalid(RequestError):
    code = "MANIFEST_INVALID"


class ManifestBlobUnknown(RequestError):
    code = "MANIFEST_BLOB_UNKNOWN"


class SizeInvalid(RequestError):
    code = "SIZE_INVALID"


class MalformedRequest(RequestError):
    code = "UNSUPPORTED"


class Unsupported(RequestError):
    code = "UNSUPPORTED"
    status = 405


class NotFound(ProxydError):
    status = 404


class EndpointUnknown(NotFound):
    code = "UNSUPPORTED"


class NameUnknown(NotFound):
    code = "NAME_UNKNOWN"


class ManifestUnknown(NotFound):
    code = "MANIFEST_UNKNOWN"


class BlobUnknown(NotFound):
    code = "BLOB_UNKNOWN"


class BlobUploadUnknown(NotFound):
    code = "BLOB_UPLOAD_UNKNOWN"


class Unauthorized(ProxydError):
    code = "UNAUTHORIZED"
    status = 401


class Denied(ProxydError):
    code = "DENIED"
    status = 403


class TooManyRequests(ProxydError):
    code = "TOOMANYREQUESTS"
    status = 429


class ManifestTooLarge(ProxydError):
    code = "SIZE_INVALID"
    status = 413


class Offline(ProxydError):
    code = "UNAVAILABLE"
    status = 503


class Overloaded(ProxydError):
    code = "UNAVAILABLE"
    status = 503


class UpstreamError(ProxydError):
    code = "UNAVAILABLE"
    status = 502


class NoCapableHost(UpstreamError):
    pass


class TokenError(UpstreamError):
    pass


class DigestMismatch(UpstreamError):
    code = "DIGEST_INVALID"

    def __init__(self, expected: str, actual: str, *, host: str = ""):
        where = f" from {host}" if host else ""
        super().__init__(
            f"content{where} does not match its digest: expected {expected}, got {actual}",
            detail={"expected": expected, "actual": actual},
        )
        self.expected = expected
        self.actual = actual


# How a registry's refusal reads as proxyd's error (`proxyd.refusal`), for pulls and
# pushes alike: the registry's own OCI code when proxyd knows it, else its status.
BY_CODE: dict[str, type[ProxydError]] = {
    error.code: error
    for error in (
        BlobUnknown,
        BlobUploadInvalid,
        BlobUploadUnknown,
        Denied,
        DigestInvalid,
        ManifestBlobUnknown,
        ManifestInvalid,
        ManifestUnknown,
        NameInvalid,
        NameUnknown,
        SizeInvalid,
        TagInvalid,
        Unauthorized,
        Unsupported,
    )
}
BY_STATUS: dict[int, type[ProxydError]] = {
    401: Unauthorized,
    403: Denied,
    405: Unsupported,
    413: ManifestTooLarge,
    416: RangeNotSatisfiable,
}


ERROR_BODY_LIMIT = 64 * 1024  # bytes of a registry's error body read for its message


def oci_errors(body: bytes) -> list[dict[str, Any]]:
    """The `errors` of an OCI error body (`{"errors": [{"code", "message", ...}]}`);
    none when the body is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    found = data.get("errors") if isinstance(data, dict) else None
    return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []


def said(errors: list[dict[str, Any]]) -> str:
    """What a registry's errors say, for a client's message: their messages, else codes."""
    return "; ".join(str(e.get("message") or e.get("code")) for e in errors)
