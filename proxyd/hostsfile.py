"""The hosts.toml format: the settings tables of a host chain, read from containerd's
hosts.toml files and proxyd's own `[namespaces."…"]` tables into `proxyd.hosts` chains.

One model reads both, so a file can move between a containerd hosts directory and
proxyd's TOML unchanged. Kept apart from the pure chain types (as containerd keeps
`config/hosts.go` apart from `registry.go`): this room holds the pydantic models, the
TOML reading and containerd's directory spelling (`host_port_`).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from proxyd.hosts import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_TAG_TTL,
    Capability,
    Namespace,
    RegistryHost,
    api_root,
    default_server,
    is_local,
)
from proxyd.reference import HOST_RE


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _as_client_pairs(value: Any) -> Any:
    """hosts.toml `client` is a path, a list of paths, or a list of [cert, key] pairs."""
    pairs = []
    for item in _as_list(value) or []:
        if isinstance(item, str):
            pairs.append((item, None))
        elif isinstance(item, list) and len(item) in (1, 2):
            pairs.append((item[0], item[1] if len(item) == 2 else None))
        else:
            raise ValueError("client must be a path or a [cert, key] pair")
    return pairs


def _as_headers(value: Any) -> Any:
    return {k: _as_list(v) for k, v in (value or {}).items()}


StrList = Annotated[list[str], BeforeValidator(_as_list)]
ClientPairs = Annotated[list[tuple[str, str | None]], BeforeValidator(_as_client_pairs)]
Headers = Annotated[dict[str, list[str]], BeforeValidator(_as_headers)]


class HostSettings(BaseModel):
    """One `[host."…"]` table, or the top level of a hosts.toml for the server."""

    model_config = ConfigDict(extra="forbid")

    capabilities: list[str] | None = Field(
        None,
        description="pull, resolve, push; unset: all for the server, pull+resolve for a mirror",
    )
    ca: StrList = Field(
        default_factory=list, description="CA file(s) trusted besides the system's (path or list)"
    )
    client: ClientPairs = Field(
        default_factory=list, description="client certificate: a path or [cert, key] pairs"
    )
    skip_verify: bool = Field(False, description="do not verify the host's TLS certificate")
    header: Headers = Field(default_factory=dict, description="extra headers sent to this host")
    override_path: bool = Field(False, description="the URL's path is the API root (no /v2)")
    connect_timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0, description="seconds")
    read_timeout: float = Field(
        DEFAULT_READ_TIMEOUT, gt=0, description="seconds without a byte before giving up"
    )


class NamespaceSettings(HostSettings):
    """A namespace: containerd's hosts.toml, plus proxyd's per-namespace options."""

    server: str | None = Field(
        None,
        description="the upstream's URL; unset: the namespace's own host (docker.io: registry-1)",
    )
    host: dict[str, HostSettings] = Field(
        default_factory=dict, description='mirrors, tried first in order: [host."URL"] tables'
    )
    tag_ttl: float = Field(
        DEFAULT_TAG_TTL, ge=0, description="seconds a tag, tag list or referrers answer is fresh"
    )
    allow_push: bool = Field(
        False, description="forward pushes (uploads, manifest PUT) to the upstream server"
    )
    allow_delete: bool = Field(False, description="forward manifest and blob DELETE upstream")
    convert_legacy_config: bool = Field(
        False, description="serve octet-stream image configs as Docker schema2 configs"
    )


def make_host(
    url: str,
    settings: HostSettings,
    *,
    is_mirror: bool,
    base_dir: Path | None = None,
) -> RegistryHost:
    if "://" not in url:
        url = f"{'http' if is_local(url.split('/')[0]) else 'https'}://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"invalid host URL {url!r}: expected http(s)://host[:port][/path]")
    if not HOST_RE.fullmatch(parts.netloc):
        raise ValueError(f"invalid host {parts.netloc!r} in {url!r}")
    if not settings.capabilities:  # unset or empty: containerd's rule, defaults apply
        capabilities = Capability.all() if not is_mirror else Capability.PULL | Capability.RESOLVE
    else:
        capabilities = Capability.parse(settings.capabilities)

    def resolve(p: str) -> str:
        return str(base_dir / p) if base_dir and not Path(p).is_absolute() else p

    return RegistryHost(
        scheme=parts.scheme,
        host=parts.netloc,
        path=api_root(parts.path, settings.override_path),
        capabilities=capabilities,
        is_mirror=is_mirror,
        headers=tuple((k, v) for k, values in settings.header.items() for v in values),
        ca=tuple(resolve(p) for p in settings.ca),
        client=tuple((resolve(c), resolve(k) if k else None) for c, k in settings.client),
        skip_verify=settings.skip_verify,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )


def build_namespace(
    name: str,
    settings: NamespaceSettings,
    *,
    source: str,
    base_dir: Path | None = None,
) -> Namespace:
    mirrors = [
        make_host(url, host, is_mirror=True, base_dir=base_dir)
        for url, host in settings.host.items()
    ]
    server = make_host(
        settings.server or default_server(name), settings, is_mirror=False, base_dir=base_dir
    )
    return Namespace(
        name=name,
        hosts=(*mirrors, server),
        source=source,
        tag_ttl=settings.tag_ttl,
        convert_legacy_config=settings.convert_legacy_config,
        allow_push=settings.allow_push,
        allow_delete=settings.allow_delete,
    )


def parse_hosts_toml(text: str) -> NamespaceSettings:
    """Read one containerd hosts.toml; tables keep their file order (dicts are ordered)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid TOML: {exc}") from None
    try:
        return NamespaceSettings.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
    )


def hosts_dir_namespace_name(directory: str) -> str:
    """containerd's `hostDirectory` spells `host:port` as `host_port_` (filesystems may
    forbid colons); `host_port` and `host:port` are accepted too."""
    match = re.fullmatch(r"(.+)_(\d{1,5})_?", directory)
    if match and ":" not in directory:
        return f"{match[1]}:{match[2]}"
    return directory


@dataclass(frozen=True)
class HostsFile:
    settings: NamespaceSettings
    directory: Path  # relative `ca` and `client` paths resolve against it


def load_hosts_dir(directory: Path) -> dict[str, HostsFile]:
    """`DIR/<namespace>/hosts.toml`, and `DIR/_default/hosts.toml` for the rest."""
    found: dict[str, HostsFile] = {}
    if not directory.is_dir():
        raise ValueError(f"hosts directory {directory} does not exist")
    for path in sorted(directory.glob("*/hosts.toml")):
        name = path.parent.name
        if name != "_default":
            name = hosts_dir_namespace_name(name)
        try:
            found[name] = HostsFile(parse_hosts_toml(path.read_text()), path.parent)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
    return found
