"""Forward proxies: which one (if any) a request to a URL goes through. Pure: the
environment is passed in as a mapping, and nothing here opens a connection.

containerd's transport takes its proxy from Go's `http.ProxyFromEnvironment`
(golang.org/x/net/http/httpproxy), and so does proxyd, rule for rule: `HTTPS_PROXY`
for https URLs, `HTTP_PROXY` for http ones (never the other as a fallback), the
upper-case name before the lower-case one, a value without a scheme read as
`http://`; `NO_PROXY` a comma-separated list of domains (`example.com` also matches
its subdomains, `.example.com` and `*.example.com` only them), IP addresses and CIDR
blocks, each optionally with a port, or `*` for everything; `localhost` and loopback
addresses never go through the environment's proxy.

A host may also name its own proxy (hosts.toml `proxy`, a proxyd extension): that
proxy for every request made for the host, whatever its address, or `"direct"` for
none. Credentials in a proxy URL (`http://user:pass@proxy:3128`) are kept apart from
the URL, so printing or logging a `Proxy` never shows them; they go only to the proxy.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Proxy:
    """A forward proxy: its URL without credentials, and the credentials apart."""

    url: str  # scheme://host:port
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.url

    @property
    def authorization(self) -> str | None:
        """`Proxy-Authorization` for the proxy's credentials (Basic, as Go sends them)."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    @classmethod
    def parse(cls, text: str, what: str = "proxy") -> Proxy:
        """`http://[user:pass@]host[:port]`, `https://…`, or `host[:port]` (then
        http, as Go reads it; a path is ignored, as Go ignores it). A scheme proxyd
        cannot speak is a ValueError, whose message never holds the credentials."""
        text = text.strip()
        if "://" not in text:
            text = f"http://{text}"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{what}: not a proxy URL ({exc})") from None
        if parts.scheme.lower() not in _SCHEMES:
            raise ValueError(
                f"{what}: proxyd speaks to http:// and https:// proxies only, not {parts.scheme}://"
            )
        if not parts.hostname:
            raise ValueError(f"{what}: a proxy URL needs a host")
        host = parts.hostname
        netloc = f"[{host}]" if ":" in host else host
        if port is not None:
            netloc += f":{port}"
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(f"{parts.scheme.lower()}://{netloc}", username, password)


# A host's own choice: its proxy, none ("direct"), or the environment's rule.
HostProxy = Proxy | Literal["direct", "environment"]


def parse_host_proxy(value: str | None) -> HostProxy:
    """A hosts.toml `proxy` value: unset is the environment's rule."""
    if value is None:
        return "environment"
    if value.strip().lower() == "direct":
        return "direct"
    return Proxy.parse(value, "proxy")


@dataclass(frozen=True)
class _NoProxyEntry:
    """One NO_PROXY entry: a domain (suffix), an address or a network, and a port."""

    domain: str | None = None  # with its leading dot
    exact_too: bool = False  # `example.com` matches example.com itself, too
    address: IPAddress | None = None
    network: IPNetwork | None = None
    port: str = ""  # empty: any port

    def matches(self, host: str, port: str, ip: IPAddress | None) -> bool:
        if self.port and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        if self.address is not None:
            return ip is not None and ip == self.address
        assert self.domain is not None
        return host.endswith(self.domain) or (self.exact_too and host == self.domain[1:])


@dataclass(frozen=True)
class ProxyEnvironment:
    """HTTP_PROXY, HTTPS_PROXY and NO_PROXY as Go reads them."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: str = ""
    _exceptions: tuple[_NoProxyEntry, ...] = field(default=(), repr=False, compare=False)
    _everything: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ProxyEnvironment:
        """Read the variables; a value proxyd cannot use is a ValueError naming it
        (Go would go direct without a word: on a network that needs the proxy, a
        failure at start says more than every pull failing)."""

        def read(upper: str) -> tuple[str, str]:
            for name in (upper, upper.lower()):
                if environ.get(name):
                    return name, environ[name]
            return upper, ""

        proxies: list[Proxy | None] = []
        for variable in ("HTTP_PROXY", "HTTPS_PROXY"):
            name, value = read(variable)
            proxies.append(Proxy.parse(value, name) if value.strip() else None)
        return cls.make(proxies[0], proxies[1], read("NO_PROXY")[1])

    @classmethod
    def make(cls, http: Proxy | None, https: Proxy | None, no_proxy: str = "") -> ProxyEnvironment:
        exceptions, everything = _parse_no_proxy(no_proxy)
        return cls(http, https, no_proxy, exceptions, everything)

    def proxy_for(self, url: str) -> Proxy | None:
        """The proxy for `url`, or None to connect directly."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None:
            return None
        try:
            port = str(parts.port or _DEFAULT_PORTS[scheme])
        except ValueError:
            port = _DEFAULT_PORTS[scheme]
        return proxy if self._use_proxy(parts.hostname or "", port) else None

    def _use_proxy(self, host: str, port: str) -> bool:
        """Go's `useProxy`: never for localhost or a loopback address; else unless
        NO_PROXY names the host (or `*`)."""
        host = _ascii(host.strip().lower())
        if host == "localhost":
            return False
        ip = _ip(host)
        if ip is not None and ip.is_loopback:
            return False
        if self._everything:
            return False
        return not any(e.matches(host, port, ip) for e in self._exceptions)


def route(choice: HostProxy, environment: ProxyEnvironment, url: str) -> Proxy | None:
    """The proxy a request made for a host (to its own origin, its token server, or
    wherever it redirects) goes through: the host's own, none, or the environment's
    for that URL."""
    if choice == "direct":
        return None
    if choice == "environment":
        return environment.proxy_for(url)
    return choice


@dataclass(frozen=True)
class Via:
    """What a request needs to go through a proxy: aiohttp's arguments (`proxy=`, and
    `proxy_headers=` for the CONNECT of a tunnel), and the headers of the request
    itself (plain http, where the request goes to the proxy). The proxy's credentials
    reach the proxy alone either way: in the CONNECT, never inside the tunnel; and a
    proxy removes `Proxy-Authorization` before it forwards a plain request."""

    arguments: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


DIRECT = Via()


def via(proxy: Proxy | None, url: str) -> Via:
    """How a request to `url` goes through `proxy` (None: directly)."""
    if proxy is None:
        return DIRECT
    authorization = proxy.authorization
    if authorization is None:
        return Via({"proxy": proxy.url})
    if urlsplit(url).scheme.lower() == "https":
        return Via({"proxy": proxy.url, "proxy_headers": {"Proxy-Authorization": authorization}})
    return Via({"proxy": proxy.url}, {"Proxy-Authorization": authorization})


def describe_route(choice: HostProxy, environment: ProxyEnvironment, url: str) -> str:
    """How requests to `url` leave proxyd, in words (credentials never shown)."""
    proxy = route(choice, environment, url)
    if choice == "direct":
        return "direct (proxy = direct)"
    if choice != "environment":
        return f"through the proxy {proxy}"
    if proxy is None:
        return "direct"
    variable = "HTTPS_PROXY" if urlsplit(url).scheme == "https" else "HTTP_PROXY"
    return f"through the proxy {proxy} ({variable})"


def _parse_no_proxy(value: str) -> tuple[tuple[_NoProxyEntry, ...], bool]:
    """Go's `config.init`: best effort, entries it cannot read are ignored."""
    exceptions: list[_NoProxyEntry] = []
    for raw in value.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return (), True
        if "/" in entry:
            try:
                exceptions.append(_NoProxyEntry(network=ipaddress.ip_network(entry, strict=False)))
            except ValueError:
                pass
            else:
                continue
        split = _split_host_port(entry)
        if split is not None:
            host, port = split
            if not host:
                continue  # `:1`: no host, malformed
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
        else:
            host, port = entry, ""
        address = _ip(host)
        if address is not None:
            exceptions.append(_NoProxyEntry(address=address, port=port))
            continue
        if not host:
            continue
        if host.startswith("*."):
            host = host[1:]
        exact_too = not host.startswith(".")
        if exact_too:
            host = f".{host}"
        exceptions.append(_NoProxyEntry(domain=_ascii(host), exact_too=exact_too, port=port))
    return tuple(exceptions), False


def _split_host_port(text: str) -> tuple[str, str] | None:
    """Go's `net.SplitHostPort`, or None where it fails (no port, too many colons)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            return None
        host, port = text[1:end], text[end + 2 :]
        return (host, port) if ":" not in port else None
    host, colon, port = text.rpartition(":")
    if not colon or ":" in host:
        return None
    return host, port


def _ip(host: str) -> IPAddress | None:
    """An address (an IPv4 one inside IPv6 read as IPv4, as Go compares them)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _ascii(host: str) -> str:
    """A name's ASCII (punycode) form, as NO_PROXY entries and hosts are compared."""
    if host.isascii():
        return host
    try:
        return ".".join(
            label.encode("idna").decode("ascii") if label else label for label in host.split(".")
        )
    except UnicodeError:
        return host
