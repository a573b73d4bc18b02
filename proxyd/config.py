"""proxyd's settings: flags, then `PROXYD_*` environment variables, then the TOML file,
then the embedded defaults (written out in config/proxyd.toml).

`Settings` is what was configured, validated, with every setting's default and
description (the settings reference in README is generated from them); what proxyd
builds from it to run on is `proxyd.runtime`'s `RuntimeConfig`.
"""

from __future__ import annotations

import json
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
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

from proxyd.clustersettings import ClusterSettings
from proxyd.credentials import Credential
from proxyd.hostsfile import NamespaceSettings
from proxyd.inbound import AuthRequired
from proxyd.reference import DOCKER_HUB, HOST_RE

MAX_MANIFEST_SIZE = 4 * 1048 * 1048  # containerd's MaxManifestSize


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
    import platformdirs  # here: a daemon given its cache_dir never needs it (0.3 MiB)

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
    direct_writes: bool = Field(
        True,
        description="big cold bodies (over TLS from 8 MiB, plain http from 1 GiB) are "
        "written with O_DIRECT and sent from memory, not through the page cache; "
        "false: always through the page cache (a blob stays there for its next reader)",
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
    preconnect: bool = Field(
        True,
        description="at start, ask the hosts of each configured namespace and of the "
        "default one `GET /v2/` in the background (no credentials, 10 s at most): the "
        "first pull then finds a connection open and the registry's challenge known; "
        "nothing waits for it; false: nothing goes upstream before a client asks",
    )
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

    @field_validator("cluster")
    @classmethod
    def _check_peer_listen(cls, value: ClusterSettings | None) -> ClusterSettings | None:
        if value is not None and value.listen is not None:
            split_listen(value.listen)
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
