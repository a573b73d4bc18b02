"""proxyd's settings: flags, then `PROXYD_*` environment variables, then the TOML file,
then the embedded defaults (written out in config/proxyd.toml).

`Settings` is the validated whole; `Registry` is what the server runs on: every
namespace's host chain, layered as containerd does (explicit namespaces in the TOML
file, then the hosts directory, then the built-in default for docker.io).
"""

from __future__ import annotations

import base64
import json
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from proxyd.hosts import (
    HostsFile,
    Namespace,
    NamespaceSettings,
    build_namespace,
    load_hosts_dir,
)
from proxyd.reference import DOCKER_HUB, HOST_RE

MAX_MANIFEST_SIZE = 4 * 1048 * 1048  # containerd's MaxManifestSize


class ConfigError(Exception):
    """Invalid configuration: the message says what and where."""


class Credential(BaseModel):
    """Credentials for one registry host (`[credentials."host:port"]`)."""

    model_config = ConfigDict(extra="forbid")

    username: str | None = None
    password: str | None = Field(None, repr=False)
    identity_token: str | None = Field(None, repr=False)  # an OAuth2 refresh token
    registry_token: str | None = Field(None, repr=False)  # a bearer token used as is

    def __repr__(self) -> str:  # never print secrets, even by accident
        return f"Credential(username={self.username!r})"


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


class Settings(BaseSettings):
    """Every setting; each top-level one is also `--flag-name` and `PROXYD_FLAG_NAME`."""

    model_config = SettingsConfigDict(
        env_prefix="PROXYD_", extra="forbid", case_sensitive=False, env_nested_delimiter="__"
    )

    listen: str = Field("127.0.0.1:5000", description="address and port to serve on")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="where blobs live")
    hosts_dir: Path | None = Field(None, description="containerd-style hosts directory")
    docker_config: Path | None = Field(None, description="docker config.json with `auths`")
    default_namespace: str = Field(DOCKER_HUB, description="namespace for unprefixed names")
    allow_unconfigured_namespaces: bool = Field(
        False,
        description="route any registry host named in a request (ns= or a path prefix) "
        "to that host, as containerd's defaults would; off so proxyd is no open relay",
    )
    log_format: Literal["auto", "json", "console"] = Field("auto", description="log output")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    max_manifest_size: int = Field(MAX_MANIFEST_SIZE, gt=0, description="bytes")
    user_agent: str = Field("proxyd/0.1", description="User-Agent sent upstream")
    namespaces: dict[str, NamespaceSettings] = Field(
        default_factory=dict, description="host chains by namespace (hosts.toml tables)"
    )
    credentials: dict[str, Credential] = Field(default_factory=dict)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    offline: bool = Field(False, description="serve from the cache alone, never ask upstream")
    breaker_failures: int = Field(
        3, ge=1, description="consecutive failures after which a host is skipped"
    )
    breaker_cooldown: float = Field(
        30.0, gt=0, description="seconds a failing host is skipped before a probe"
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

    @field_validator("namespaces", "credentials")
    @classmethod
    def _check_hosts(cls, value: dict[str, Any]) -> dict[str, Any]:
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


def read_docker_config(path: Path) -> dict[str, Credential]:
    """docker's config.json `auths`: `auth` (base64 user:password), `username` and
    `password`, or `identitytoken`; keyed by registry host as docker writes it."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read docker config {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"docker config {path} is not JSON: {exc}") from None
    auths = data.get("auths", {}) if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        raise ConfigError(f"docker config {path}: expected an object with an `auths` object")
    found: dict[str, Credential] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"docker config {path}: auths.{key} is not an object")
        username, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            username, password = _decode_auth(entry["auth"], f"{path}: auths.{key}.auth")
        try:
            found[_docker_config_host(key)] = Credential(
                username=username or None,
                password=password or None,
                identity_token=entry.get("identitytoken") or None,
                registry_token=entry.get("registrytoken") or None,
            )
        except ValidationError as exc:
            raise ConfigError(_explain(exc, path)) from None
    return found


def _decode_auth(value: object, where: str) -> tuple[str, str]:
    """`auth` is base64 of `user:password`; docker refuses anything else, and so do we."""
    try:
        decoded = base64.b64decode(value, validate=True).decode()  # type: ignore[arg-type]
    except (TypeError, ValueError, UnicodeDecodeError):
        raise ConfigError(f"{where} is not base64 of user:password") from None
    username, sep, password = decoded.partition(":")
    if not sep or not username:
        raise ConfigError(f"{where} does not decode to user:password")
    return username, password


def _docker_config_host(key: str) -> str:
    """docker writes `https://index.docker.io/v1/` for Docker Hub and may write URLs."""
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return "registry-1.docker.io" if host in ("index.docker.io", DOCKER_HUB) else host


@dataclass
class Registry:
    """The runtime view of the configuration: chains and credentials."""

    settings: Settings
    namespaces: dict[str, Namespace]
    credentials: dict[str, Credential]
    fallback: HostsFile | None = None  # hosts_dir/_default
    _synthesised: dict[str, Namespace] = field(default_factory=dict)

    def namespace(self, name: str) -> Namespace | None:
        """The chain for `name`: configured, else `_default`, else (when allowed)
        containerd's default host; None when proxyd must not route there."""
        found = self.namespaces.get(name) or self._synthesised.get(name)
        if found is not None:
            return found
        if not HOST_RE.fullmatch(name):
            return None
        if self.fallback is not None:
            built = build_namespace(
                name,
                self.fallback.settings,
                source=str(self.fallback.directory / "hosts.toml"),
                base_dir=self.fallback.directory,
            )
        elif self.settings.allow_unconfigured_namespaces:
            built = build_namespace(name, NamespaceSettings(), source="default host")
        else:
            return None
        self._synthesised[name] = built
        return built

    def credential_for(self, host: str) -> Credential | None:
        return self.credentials.get(host)


def build_registry(settings: Settings) -> Registry:
    """Layer the sources; the first that names a namespace wins (containerd's rule)."""
    namespaces: dict[str, Namespace] = {}
    fallback = None
    try:
        for name, ns in settings.namespaces.items():
            namespaces[name] = build_namespace(name, ns, source="config file")
        if settings.hosts_dir is not None:
            for name, hosts_file in load_hosts_dir(settings.hosts_dir).items():
                if name == "_default":
                    fallback = hosts_file
                elif name not in namespaces:
                    namespaces[name] = build_namespace(
                        name,
                        hosts_file.settings,
                        source=str(hosts_file.directory / "hosts.toml"),
                        base_dir=hosts_file.directory,
                    )
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
    credentials: dict[str, Credential] = {}
    if settings.docker_config is not None:
        credentials.update(read_docker_config(settings.docker_config))
    credentials.update(settings.credentials)
    return Registry(settings, namespaces, credentials, fallback)
