"""proxyd's settings: flags, then `PROXYD_*` environment variables, then the TOML file,
then the embedded defaults (written out in config/proxyd.toml).

`Settings` is what was configured, validated; `RuntimeConfig` is what proxyd runs on:
every namespace's host chain, layered as containerd does (explicit namespaces in the
TOML file, then the hosts directory, then the built-in default for docker.io), and the
credentials for each host (the TOML file's over the docker config's). Reading
hosts.toml tables is `proxyd.hostsfile`'s, reading docker's config `proxyd.credentials`';
this module layers them and turns their errors into `ConfigError`.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretBytes,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from proxyd import tls
from proxyd.clustersettings import ClusterSettings, load_peer_secret
from proxyd.credentials import Credential, CredentialsError, read_docker_config
from proxyd.hosts import Namespace
from proxyd.hostsfile import HostsFile, NamespaceSettings, build_namespace, load_hosts_dir
from proxyd.inbound import AuthRequired, load_htpasswd
from proxyd.proxies import Proxy, ProxyEnvironment
from proxyd.reference import DOCKER_HUB, HOST_RE

MAX_MANIFEST_SIZE = 4 * 1048 * 1048  # containerd's MaxManifestSize
# Namespaces built for names clients send (ns=, a path prefix) under `_default` or
# allow_unconfigured_namespaces: the most recently used are kept, so a client naming
# ever new registries cannot grow proxyd's memory; one dropped is built again when asked.
MAX_SYNTHESISED_NAMESPACES = 1024


class ConfigError(Exception):
    """Invalid configuration: the message says what and where."""


def _namespace_list(value: Any) -> Any:
    """A list, or (from PROXYD_ALLOW_PUSH) a JSON list or comma-separated names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise ValueError(f"not a JSON list: {text!r}") from None
        return [name.strip() for name in text.split(",") if name.strip()]
    return value


NamespaceList = Annotated[list[str], NoDecode, BeforeValidator(_namespace_list)]


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("proxyd"))


class CacheSettings(BaseModel):
    """Where small responses (tags, tag lists, referrers) are kept."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["sqlite", "redis"] = Field(
        "sqlite", description="sqlite: a file in cache_dir; redis: shared by replicas"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="with backend = redis")
    max_size: ByteSize | None = Field(
        None, description='evict least recently used blobs above this ("20GiB"); none: no limit'
    )
    max_age: timedelta | None = Field(
        None, description='evict blobs unused this long (seconds or "P30D"); none: no limit'
    )
    manifest_memory: ByteSize = Field(
        ByteSize(32 << 20),
        description="memory for the manifests and tags served last: a hit reads no file; 0: off",
    )
    redis_timeout: float = Field(
        1.0,
        gt=0,
        description="seconds a Redis call may take; then Redis counts as unreachable "
        "(lookups are misses) until it answers again",
    )


class Settings(BaseSettings):
    """Every setting; each top-level one is also `--flag-name` and `PROXYD_FLAG_NAME`."""

    model_config = SettingsConfigDict(
        env_prefix="PROXYD_", extra="forbid", case_sensitive=False, env_nested_delimiter="__"
    )

    listen: str = Field("127.0.0.1:5000", description="address and port to serve on")
    tls_cert: Path | None = Field(None, description="serve HTTPS with this PEM certificate")
    tls_key: Path | None = Field(None, description="the PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None, description="with tls_cert: clients must present a certificate from this CA"
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="where blobs live")
    hosts_dir: Path | None = Field(None, description="containerd-style hosts directory")
    docker_config: Path | None = Field(None, description="docker config.json with `auths`")
    credential_refresh: float = Field(
        300.0,
        ge=0,
        description="seconds between reads of docker_config and its credential helpers "
        "while serving (a rotated secret needs no restart); 0: only at start, on SIGHUP "
        "and after an upstream refused them",
    )
    default_namespace: str = Field(DOCKER_HUB, description="namespace for unprefixed names")
    allow_unconfigured_namespaces: bool = Field(
        False,
        description="route any registry host named in a request (ns= or a path prefix) "
        "to that host, as containerd's defaults would; off so proxyd is no open relay",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json, console, or auto: console on a terminal, JSON elsewhere"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="least level logged"
    )
    max_manifest_size: int = Field(MAX_MANIFEST_SIZE, gt=0, description="bytes")
    user_agent: str = Field("proxyd/0.1", description="User-Agent sent upstream")
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a client may take to send a request's line and headers, "
        "from their first byte; a slower one is disconnected",
    )
    keepalive_timeout: float = Field(
        60.0, gt=0, description="seconds a client connection may idle between requests"
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="client connections served at once; one more is answered 503 "
        "(Retry-After: 1) and closed",
    )
    allow_link_local: bool = Field(
        False,
        description="follow a registry's redirects and token realms to link-local "
        "addresses (169.254.0.0/16, fe80::/10), where cloud metadata services answer",
    )
    min_transfer_rate: ByteSize = Field(
        ByteSize(1024),
        description="bytes per second an upstream body must average over each minute; "
        "a slower one is cut, as the host's failure; 0: no bound",
    )
    namespaces: dict[str, NamespaceSettings] = Field(
        default_factory=dict, description="host chains by namespace (hosts.toml tables)"
    )
    credentials: dict[str, Credential] = Field(default_factory=dict)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    cluster: ClusterSettings | None = Field(
        None, description="a fleet of proxyds sharing blobs and uploads through Redis"
    )
    offline: bool = Field(False, description="serve from the cache alone, never ask upstream")
    breaker_failures: int = Field(
        3, ge=1, description="consecutive failures after which a host is skipped"
    )
    breaker_cooldown: float = Field(
        30.0, gt=0, description="seconds a failing host is skipped before a probe"
    )
    retry_max_wait: float = Field(
        10.0,
        ge=0,
        description="seconds one request may spend asking hosts again (408, 429, and "
        "5xx or a dropped connection from the last host); a longer Retry-After is not "
        "waited for: the host is skipped for that kind of request until it ends",
    )
    allow_push: NamespaceList = Field(
        default_factory=list,
        description="namespaces whose pushes are forwarded upstream (or allow_push = true "
        "in a namespace's table)",
    )
    upload_ttl: float = Field(
        3600.0, gt=0, description="seconds an idle upload session is kept before it expires"
    )
    htpasswd: Path | None = Field(
        None, description="inbound users (bcrypt htpasswd); clients then authenticate"
    )
    auth_required: AuthRequired | None = Field(
        None,
        description='with htpasswd: "push" (default) or "all" (pulls too) need credentials',
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("namespaces", "credentials", "allow_push")
    @classmethod
    def _check_hosts(cls, value: dict[str, Any] | list[str]) -> dict[str, Any] | list[str]:
        for name in value:
            if not HOST_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a registry host name")
        return value


def split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"listen must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Flags (only those given) win over the environment, which wins over the file."""
    given = {k: v for k, v in flags.items() if v is not None}

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [init_settings, env_settings]
            if config_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            return tuple(sources)

    if config_file is not None:
        try:
            tomllib.loads(config_file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file}: invalid TOML: {exc}") from None
    try:
        return _FromFile(**given)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, config_file)) from None


def _explain(exc: ValidationError, config_file: Path | None) -> str:
    where = f" in {config_file}" if config_file else ""
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


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
        namespaces[DOCKER_HUB] = build_namespace(DOCKER_HUB, NamespaceSettings(), source="built-in")
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
        if host.scheme != "https":
            continue
        try:
            tls.upstream_context(host, same_origin=True)
        except tls.TLSFileError as exc:
            where = source if host.host == "fallback.invalid" else f"{source}, {host.origin}"
            raise ConfigError(f"{where}: {exc}") from None
