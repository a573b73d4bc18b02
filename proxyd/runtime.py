"""The configuration as proxyd runs it (`RuntimeConfig`): every namespace's host chain
built and layered as containerd does (explicit namespaces in the TOML file, then the
hosts directory, then the built-in default for docker.io), the credentials for each
host (the TOML file's over the docker config's), proxyd's own users, the proxies of
the environment. `proxyd.config` reads what was configured; this module builds from
it what the daemon runs on, and turns the readers' errors into `ConfigError`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pydantic import SecretBytes

from proxyd import tls
from proxyd.clustersettings import ClusterSettings, load_peer_secret
from proxyd.config import ConfigError, Settings
from proxyd.credentials import Credential, CredentialsError, read_docker_config
from proxyd.hosts import Namespace
from proxyd.hostsfile import HostsFile, NamespaceSettings, build_namespace, load_hosts_dir
from proxyd.inbound import AuthRequired, load_htpasswd
from proxyd.proxies import Proxy, ProxyEnvironment
from proxyd.reference import DOCKER_HUB, HOST_RE

# Namespaces built for names clients send (ns=, a path prefix) under `_default` or
# allow_unconfigured_namespaces: the most recently used are kept, so a client naming
# ever new registries cannot grow proxyd's memory; one dropped is built again when asked.
MAX_SYNTHESISED_NAMESPACES = 1024
BUILT_IN = "built-in"  # the source of Docker Hub's namespace where nothing configures it


@dataclass
class RuntimeConfig:
    """The configuration as proxyd runs it: every namespace's chain built, the
    credentials and inbound users read (and read again by `proxyd.reload`)."""

    settings: Settings
    namespaces: dict[str, Namespace]
    credentials: dict[str, Credential]
    fallback: HostsFile | None = None  # hosts_dir/_default
    inbound_users: dict[str, bytes] | None = None  # from `htpasswd`: user -> bcrypt hash
    peer_secret: SecretBytes | None = None  # from [cluster] secret_file
    proxy_env: ProxyEnvironment = field(default_factory=ProxyEnvironment)
    ignored_keys: list[tuple[str, str]] = field(default_factory=list)  # (file, key): warned
    _synthesised: OrderedDict[str, Namespace] = field(default_factory=OrderedDict)

    def namespace(self, name: str) -> Namespace | None:
        """The chain for `name`: configured, else `_default`, else (when allowed)
        containerd's default host; None when proxyd must not route there."""
        found = self.namespaces.get(name)
        if found is not None:
            return found
        found = self._synthesised.get(name)
        if found is not None:
            self._synthesised.move_to_end(name)
            return found
        if not HOST_RE.fullmatch(name):
            return None
        if self.fallback is not None:
            built = build_namespace(
                name,
                self.fallback.settings,
                source=self.fallback.source,
                base_dir=self.fallback.directory,
            )
        elif self.settings.allow_unconfigured_namespaces:
            built = build_namespace(name, NamespaceSettings(), source="default host")
        else:
            return None
        self._synthesised[name] = built
        if len(self._synthesised) > MAX_SYNTHESISED_NAMESPACES:
            self._synthesised.popitem(last=False)
        return built

    def configured_hostnames(self) -> set[str]:
        """The host names of every host the configuration names (namespaces, and the
        mirrors of hosts_dir/_default) and of their forward proxies (a host's own, the
        environment's): the user's choice, resolved as they are (proxyd.targets)."""
        hosts = [h for ns in self.namespaces.values() for h in ns.hosts]
        if self.fallback is not None:
            probe = build_namespace(
                "fallback.invalid",
                self.fallback.settings,
                source="hosts_dir/_default",
                base_dir=self.fallback.directory,
            )
            hosts += [h for h in probe.hosts if h.host != "fallback.invalid"]
        urls = [f"//{h.host}" for h in hosts]
        proxies = [h.proxy for h in hosts] + [self.proxy_env.http, self.proxy_env.https]
        urls += [p.url for p in proxies if isinstance(p, Proxy)]
        return {urlsplit(url).hostname or url for url in urls}

    def credential_for(self, host: str) -> Credential | None:
        return self.credentials.get(host)

    def replace_credentials(self, fresh: dict[str, Credential]) -> list[str]:
        """Use `fresh` from now on; the hosts whose credentials changed."""
        hosts = self.credentials.keys() | fresh.keys()
        changed = sorted(h for h in hosts if self.credentials.get(h) != fresh.get(h))
        self.credentials = fresh
        return changed

    def push_allowed(self, namespace: Namespace) -> bool:
        """`allow_push = true` in the namespace's table, or its name in `allow_push`."""
        return namespace.allow_push or namespace.name in self.settings.allow_push

    @property
    def auth_required(self) -> AuthRequired | None:
        """What clients must authenticate for; None without inbound users."""
        if self.inbound_users is None:
            return None
        return self.settings.auth_required or "push"


def build_runtime(settings: Settings, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Layer the sources; the first that names a namespace wins (containerd's rule).
    `environ` (os.environ unless given) holds HTTP_PROXY, HTTPS_PROXY and NO_PROXY."""
    namespaces: dict[str, Namespace] = {}
    fallback = None
    ignored: list[tuple[str, str]] = []
    try:
        for name, ns in settings.namespaces.items():
            namespaces[name] = build_namespace(name, ns, source="config file")
        if settings.hosts_dir is not None:
            for name, hosts_file in load_hosts_dir(settings.hosts_dir).items():
                ignored += [(hosts_file.source, key) for key in hosts_file.ignored]
                if name == "_default":
                    fallback = hosts_file
                elif name not in namespaces:
                    namespaces[name] = build_namespace(
                        name,
                        hosts_file.settings,
                        source=hosts_file.source,
                        base_dir=hosts_file.directory,
                    )
        proxy_env = ProxyEnvironment.from_environ(os.environ if environ is None else environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if DOCKER_HUB not in namespaces and fallback is None:
        namespaces[DOCKER_HUB] = build_namespace(DOCKER_HUB, NamespaceSettings(), source=BUILT_IN)
    if (
        settings.default_namespace not in namespaces
        and fallback is None
        and not settings.allow_unconfigured_namespaces
    ):
        raise ConfigError(
            f"default_namespace {settings.default_namespace!r} is not configured: add "
            f'[namespaces."{settings.default_namespace}"] with its server'
        )
    credentials = load_credentials(settings)
    inbound_users = load_users(settings)
    if inbound_users is None and settings.auth_required is not None:
        raise ConfigError("auth_required needs htpasswd: the file of users clients log in as")
    _check_serving_tls(settings)
    return RuntimeConfig(
        settings,
        namespaces,
        credentials,
        fallback,
        inbound_users=inbound_users,
        peer_secret=_peer_secret(settings.cluster),
        proxy_env=proxy_env,
        ignored_keys=ignored,
    )


def _peer_secret(cluster: ClusterSettings | None) -> SecretBytes | None:
    try:
        return load_peer_secret(cluster)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_credentials(settings: Settings) -> dict[str, Credential]:
    """The docker config's credentials (its helpers asked), under the TOML file's."""
    credentials: dict[str, Credential] = {}
    if settings.docker_config is not None:
        try:
            credentials.update(read_docker_config(settings.docker_config))
        except CredentialsError as exc:
            raise ConfigError(str(exc)) from None
    credentials.update(settings.credentials)
    return credentials


def load_users(settings: Settings) -> dict[str, bytes] | None:
    """The htpasswd file's users (None without one)."""
    if settings.htpasswd is None:
        return None
    try:
        return load_htpasswd(settings.htpasswd)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_serving_tls(settings: Settings) -> None:
    """tls_cert and tls_key together, readable, a certificate and its key."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError(
            "tls_cert and tls_key go together: give both (--tls-cert, --tls-key) to serve "
            "HTTPS, or neither to serve plain HTTP"
        )
    if settings.tls_cert is None or settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ConfigError(
                "tls_client_ca needs tls_cert and tls_key: client certificates are asked "
                "for only over HTTPS"
            )
        return
    try:
        tls.server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except tls.TLSFileError as exc:
        raise ConfigError(f"cannot serve HTTPS: {exc}") from None


def check_upstream_tls(runtime: RuntimeConfig) -> None:
    """Every https host's `ca` and `client` files can be read and used, so a wrong
    path is a message at start rather than a failed pull later. (Separate from
    `build_registry`, which reads a configuration without touching those files.)"""
    checks = [(ns.source, h) for ns in runtime.namespaces.values() for h in ns.hosts]
    if runtime.fallback is not None:
        source = runtime.fallback.source
        probe = build_namespace(
            "fallback.invalid",
            runtime.fallback.settings,
            source=source,
            base_dir=runtime.fallback.directory,
        )
        checks += [(source, h) for h in probe.hosts]
    for source, host in checks:
        if host.scheme != "https" or not tls.has_own_context(host, same_origin=True):
            continue  # no files of its own to check
        try:
            tls.upstream_context(host, same_origin=True)
        except tls.TLSFileError as exc:
            where = source if host.host == "fallback.invalid" else f"{source}, {host.origin}"
            raise ConfigError(f"{where}: {exc}") from None
