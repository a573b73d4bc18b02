"""An upstream's final answer other than success, read once for pulls and pushes
alike (containerd's one `unexpectedResponseErr` for resolver, fetcher and pusher):
the registry's OCI `errors`, and the proxyd error a client then gets, with the
registry's own code and message wherever proxyd knows the code.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from proxyd.errors import (
    BY_CODE,
    BY_STATUS,
    ERROR_BODY_LIMIT,
    ProxydError,
    TooManyRequests,
    UpstreamError,
    oci_errors,
    said,
)
from proxyd.upstream import Upstream


async def registry_errors(up: Upstream, what: str) -> tuple[list[dict[str, Any]], str]:
    """The `errors` of a registry's OCI error body (if it sent one) and the message a
    client is told: the host, what was asked, and what the registry said of it."""
    errors: list[dict[str, Any]] = []
    if up.response.method != "HEAD":
        try:
            errors = oci_errors(await up.response.content.read(ERROR_BODY_LIMIT))
        except aiohttp.ClientError:
            errors = []
    return errors, f"{up.host.host}: {what}: {said(errors) or up.response.status}"


async def refusal(
    up: Upstream,
    what: str,
    *,
    not_found: type[ProxydError],
    invalid: type[ProxydError] | None = None,
) -> ProxydError:
    """The error for the registry's answer: 429 keeps its Retry-After; a 4xx is the
    registry's own code where proxyd knows it, else its status (`not_found` for a 404
    without a known code, `invalid` for another 4xx: a push's BLOB_UPLOAD_INVALID, say;
    without it, as for a 5xx, the registry failed: 502 naming its status)."""
    status = up.response.status
    errors, message = await registry_errors(up, what)
    if status == 429:
        retry_after = up.response.headers.get("Retry-After")
        return TooManyRequests(message, headers={"Retry-After": retry_after} if retry_after else {})
    if 400 <= status < 500:
        code = str(errors[0].get("code")) if errors else ""
        known = BY_CODE.get(code) or BY_STATUS.get(status)
        if known is None:
            known = not_found if status == 404 else invalid
        if known is not None:
            return known(message)
    return UpstreamError(f"{message} (status {status})")


async def expect(
    up: Upstream,
    what: str,
    *,
    ok: tuple[int, ...] = (200, 206),
    not_found: type[ProxydError],
    invalid: type[ProxydError] | None = None,
) -> None:
    """Raise the refusal unless the registry answered one of `ok`."""
    if up.response.status not in ok:
        raise await refusal(up, what, not_found=not_found, invalid=invalid)
