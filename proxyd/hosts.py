"""Host chains: which registry hosts serve a namespace, and what each may be trusted with.

The shape is containerd's `remotes/docker` `RegistryHost`: a namespace has one
`server` (the upstream, trusted with every capability, tried last) and any number of
mirrors (tried first, in order, each with exactly the capabilities it lists). Pure
values and rules only; reading them from hosts.toml tables is `proxyd.hostsfile`'s
job, as containerd keeps `config/hosts.go` apart from `registry.go`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from proxyd.proxies import HostProxy
from proxyd.reference import DOCKER_HUB


class Capability(enum.Flag):
    """What a host may be asked to do (containerd's HostCapabilities)."""

    PULL = enum.auto()  # fetch content by digest: verifiable, so mirrors may do it
    RESOLVE = enum.auto()  # tag -> digest: a trusted act
    PUSH = enum.auto()
    REFERRERS = enum.auto()  # the OCI referrers API (containerd 2.x); a trusted list too

    @classmethod
    def all(cls) -> Capability:
        return cls.PULL | cls.RESOLVE | cls.PUSH | cls.REFERRERS

    @classmethod
    def mirror_default(cls) -> Capability:
        """A mirror without `capabilities`: containerd's default minus push (proxyd
        never pushes to a mirror)."""
        return cls.PULL | cls.RESOLVE | cls.REFERRERS

    @classmethod
    def parse(cls, names: list[str]) -> Capability:
        result = cls(0)
        for name in names:
            try:
                result |= cls[name.upper()]
            except KeyError:
                raise ValueError(
                    f"unknown capability {name!r} (expected pull, resolve, push or referrers)"
                ) from None
        return result

    def names(self) -> list[str]:
        return [c.name.lower() for c in Capability if c in self and c.name]


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_TAG_TTL = 60.0


@dataclass(frozen=True)
class RegistryHost:
    scheme: str
    host: str  # host[:port], as used for credentials and in URLs
    path: str  # API root, normally "/v2"
    capabilities: Capability
    is_mirror: bool
    headers: tuple[tuple[str, str], ...] = ()
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str | None], ...] = ()
    skip_verify: bool = False
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT  # None: no limit of proxyd's
    read_timeout: float = DEFAULT_READ_TIMEOUT
    proxy: HostProxy = "environment"  # through which forward proxy (proxyd.proxies)

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}"

    def url(self, suffix: str) -> str:
        """`suffix` is below the API root: `team/app/manifests/v1`."""
        return f"{self.origin}{self.path.rstrip('/')}/{suffix}"

    def is_proxy(self, namespace: str) -> bool:
        """Whether this host serves `namespace` on another registry's behalf, and so must
        be told which registry a request is for (`?ns=`): containerd's
        `RegistryHost.isProxy`, every host but the namespace's own (docker.io's own
        being registry-1.docker.io)."""
        if namespace == DOCKER_HUB and self.host == "registry-1.docker.io":
            return False
        return namespace != self.host

    def scopes(self, scope: str) -> str:
        """A request's token scopes (space-separated) as this host names repositories.
        An API root below `/v2/` (a Harbor project, `/v2/dockerhub-proxy` with
        `override_path`) is the start of every repository name the host serves, since
        the distribution API's name is all between `/v2/` and `/manifests/`: each
        repository scope is asked under that name too, so a token the host's token
        service grants covers what the host checks, from the first request on."""
        _root, v2, below = self.path.partition("/v2/")
        prefix = below.strip("/")
        if not v2 or not prefix:
            return scope
        named = [
            f"repository:{prefix}/{s.removeprefix('repository:')}"
            for s in scope.split()
            if s.startswith("repository:")
        ]
        return " ".join([*scope.split(), *named])

    def describe(self) -> str:
        role = "mirror" if self.is_mirror else "upstream"
        return f"{self.origin}{self.path} ({role}: {', '.join(self.capabilities.names())})"


@dataclass(frozen=True)
class Namespace:
    """The ordered host chain of one upstream namespace: mirrors first, server last."""

    name: str
    hosts: tuple[RegistryHost, ...]
    source: str = "built-in"
    tag_ttl: float = DEFAULT_TAG_TTL
    convert_legacy_config: bool = False
    options: dict[str, Any] = field(default_factory=dict, compare=False)
    allow_push: bool = False
    allow_delete: bool = False

    def hosts_for(self, capability: Capability) -> list[RegistryHost]:
        return [h for h in self.hosts if capability in h.capabilities]

    def confirmers(self) -> list[RegistryHost]:
        """The hosts trusted to say that a repository holds a digest, which lets proxyd
        serve its stored copy there: those trusted with names (`resolve`), as containerd
        trusts only them with tags. A pull-only mirror serves verified bytes by digest
        but never vouches for a repository: one answering 200 to every HEAD would hand
        out any blob proxyd holds. In a namespace whose hosts all lack `resolve`, the
        upstream server itself, when it serves pulls: the registry answering for its
        own repositories."""
        trusted = self.hosts_for(Capability.RESOLVE)
        return trusted or [h for h in self.hosts_for(Capability.PULL) if not h.is_mirror]

    def vouches(self, host: RegistryHost) -> bool:
        """Whether `host`'s answer about a repository counts as its confirmation."""
        return host in self.confirmers()

    @property
    def referrers_tag_capability(self) -> Capability:
        """Who is asked for the referrers tag schema (`sha256-<hex>`) when the
        referrers API has no answer: the referrers hosts, or, when no host has that
        capability, the resolve hosts (containerd's `openReferrers`)."""
        return Capability.REFERRERS if self.hosts_for(Capability.REFERRERS) else Capability.RESOLVE

    @property
    def push_host(self) -> RegistryHost | None:
        """Where pushes go: the upstream server, when it has the push capability. A
        mirror never receives a push, whatever capabilities it lists."""
        return next((h for h in self.hosts_for(Capability.PUSH) if not h.is_mirror), None)


@dataclass(frozen=True)
class Target:
    """Where a request goes: the namespace's chain and the repository upstream."""

    namespace: Namespace
    repository: str


def is_local(host: str) -> bool:
    hostname = urlsplit(f"//{host}").hostname or host
    return hostname in LOCAL_HOSTS


def default_server(namespace: str) -> str:
    """containerd's DefaultHost: docker.io lives at registry-1.docker.io; plain http
    only for loopback."""
    host = "registry-1.docker.io" if namespace == DOCKER_HUB else namespace
    return f"{'http' if is_local(host) else 'https'}://{host}"


def api_root(path: str, override_path: bool) -> str:
    """containerd's rule: the API root is the URL's path with `/v2` appended unless it
    already ends so, or `override_path` says the path is the API root as given."""
    path = "/" + path.strip("/") if path.strip("/") else ""
    if override_path:
        return path or "/"
    return path if path.endswith("/v2") else f"{path}/v2"
