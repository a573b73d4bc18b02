"""Where a registry may send proxyd: the URLs of its redirects (blob storage, CDNs)
and of its token realms, which proxyd then fetches on its own.

Only http and https are followed, and no link-local address (169.254.0.0/16,
fe80::/10) unless `allow_link_local` says so: cloud metadata services answer there
(169.254.169.254 hands out the machine's own credentials), and a registry, a mirror
or a token server that points proxyd there is one to distrust. An address written in
a URL is checked as the URL is read (`check`); a name, as proxyd resolves it
(`LinkLocalFilter`, the resolver of the upstream connections, drops link-local
answers), so a name pointed at the metadata service is refused like its address.
The hosts the configuration names are the user's choice, resolved as they are.
Behind a forward proxy the proxy resolves names: then only addresses written in URLs
are checked.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

SCHEMES = ("http", "https")
MAX_REDIRECTS = 5  # followed for one request, a registry's or a token server's
LINK_LOCAL_HINT = "allow_link_local opens it"


class RefusedTarget(aiohttp.InvalidURL):
    """A URL a registry named that proxyd does not follow (a failure of the host that
    named it, said with the reason)."""


def is_link_local(address: str) -> bool:
    """Whether an IP address (v4, v6 with or without a zone, v4 mapped into v6) is
    link-local; False for anything that is not an address."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local


def check(url: str, *, allow_link_local: bool) -> str:
    """`url`, if proxyd may follow it there; else RefusedTarget saying why."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        raise aiohttp.InvalidURL(url) from None
    if parts.scheme not in SCHEMES:
        raise RefusedTarget(url, f"refused: not http or https ({parts.scheme or 'no scheme'})")
    if not hostname:
        raise aiohttp.InvalidURL(url)
    if not allow_link_local and is_link_local(hostname):
        raise RefusedTarget(url, f"refused: a link-local address ({LINK_LOCAL_HINT})")
    return url


class LinkLocalFilter(AbstractResolver):
    """A resolver that keeps a name's link-local addresses from proxyd, but for the
    names the configuration trusts: a name with no other address cannot be reached."""

    def __init__(self, inner: AbstractResolver, trusted: Callable[[str], bool]) -> None:
        self._inner = inner
        self._trusted = trusted

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._trusted(host):
            return results
        kept = [r for r in results if not is_link_local(r["host"])]
        if not kept:
            addresses = ", ".join(sorted({r["host"] for r in results}))
            raise OSError(
                f"it resolves to link-local addresses only ({addresses}): refused, "
                f"{LINK_LOCAL_HINT}"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()
