"""The hosts.toml format: the settings tables of a host chain, read from containerd's
hosts.toml files and proxyd's own `[namespaces."…"]` tables into `proxyd.hosts` chains.

One model reads both, so a file can move between a containerd hosts directory and
proxyd's TOML unchanged. Kept apart from the pure chain types (as containerd keeps
`config/hosts.go` apart from `registry.go`): this room holds the pydantic models, the
TOML reading and containerd's directory layout (`host_port_`, and Docker's
certificate files in a directory without hosts.toml).

A hosts.toml is a file other programs read too, and containerd ignores keys it does
not know, so proxyd names an unknown key in a hosts.toml (a warning) and goes on;
in proxyd's own TOML file an unknown key is still an error, like any other typo there.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
from proxyd.proxies import parse_host_proxy
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
        description="pull, resolve, push, referrers; unset: all for the server, all but push "
        "for a mirror",
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
    dial_timeout: str | None = Field(
        None,
        description='containerd\'s connect timeout, a Go duration ("30s", "1m30s"; "0s": '
        "no limit); or connect_timeout",
    )
    connect_timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0, description="seconds")
    read_timeout: float = Field(
        DEFAULT_READ_TIMEOUT, gt=0, description="seconds without a byte before giving up"
    )
    proxy: str | None = Field(
        None,
        description="forward proxy for this host (http://[user:pass@]host:port), or "
        '"direct"; unset: HTTPS_PROXY, HTTP_PROXY and NO_PROXY',
    )

    @field_validator("dial_timeout")
    @classmethod
    def _check_dial_timeout(cls, value: str | None) -> str | None:
        if value is not None:
            parse_go_duration(value)
        return value

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        parse_host_proxy(value)
        return value

    @model_validator(mode="after")
    def _one_connect_timeout(self) -> HostSettings:
        if self.dial_timeout is not None and "connect_timeout" in self.model_fields_set:
            raise ValueError(
                "dial_timeout and connect_timeout say the same thing: give one of them"
            )
        return self

    @property
    def connect_limit(self) -> float | None:
        """Seconds to connect: dial_timeout (0: no limit, as Go's dialer) or
        connect_timeout."""
        if self.dial_timeout is None:
            return self.connect_timeout
        return parse_go_duration(self.dial_timeout) or None


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
        capabilities = Capability.all() if not is_mirror else Capability.mirror_default()
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
        connect_timeout=settings.connect_limit,
        read_timeout=settings.read_timeout,
        proxy=parse_host_proxy(settings.proxy),
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
    """Read one containerd hosts.toml; tables keep their file order (dicts are ordered).
    Keys neither containerd nor proxyd knows are left out (`read_hosts_toml` names them)."""
    return read_hosts_toml(text)[0]


def read_hosts_toml(text: str) -> tuple[NamespaceSettings, tuple[str, ...]]:
    """One hosts.toml, and the dotted names of the keys in it that were ignored."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid TOML: {exc}") from None
    ignored = _drop_unknown(data, NamespaceSettings, "")
    hosts = data.get("host")
    if isinstance(hosts, dict):
        for url, table in hosts.items():
            if isinstance(table, dict):
                ignored += _drop_unknown(table, HostSettings, f"host.{url}.")
    try:
        return NamespaceSettings.model_validate(data), tuple(ignored)
    except ValidationError as exc:
        raise ValueError(_explain(exc)) from None


def _drop_unknown(table: dict[str, Any], model: type[BaseModel], prefix: str) -> list[str]:
    unknown = [key for key in table if key not in model.model_fields]
    for key in unknown:
        del table[key]
    return [f"{prefix}{key}" for key in unknown]


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration (`time.ParseDuration`: "300ms", "1.5h", "2m30s", "0"),
    as containerd reads `dial_timeout`."""
    value = text.strip()
    sign = -1.0 if value.startswith("-") else 1.0
    body = value.lstrip("+-") if value[:1] in "+-" else value
    if body == "0":
        return 0.0
    if not body or _GO_DURATION.fullmatch(body) is None:
        raise ValueError(
            f"{text!r} is not a duration: a number and a unit (ns, us, ms, s, m, h), as "
            '"30s" or "1m30s"'
        )
    total = sum(float(number) * _GO_UNITS[unit] for number, unit in _GO_PART.findall(body))
    if sign < 0 and total:
        raise ValueError(f"{text!r}: a timeout cannot be negative")
    return total


_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # Go accepts both micro signs
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION = re.compile(rf"(?:{_GO_PART.pattern})+")


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
    ignored: tuple[str, ...] = ()  # keys of its hosts.toml proxyd does not know
    from_toml: bool = True  # False: Docker's certificate files, no hosts.toml

    @property
    def source(self) -> str:
        if self.from_toml:
            return str(self.directory / "hosts.toml")
        return f"{self.directory}/ (certificate files)"


def load_hosts_dir(directory: Path) -> dict[str, HostsFile]:
    """Every `DIR/<namespace>/` as containerd reads it (`DIR/_default/` for the rest):
    its hosts.toml, or, when it has none (or an empty one), Docker's certificate
    files in it. For `host:port`, `host_port_` wins over `host:port`, as containerd
    looks there first."""
    found: dict[str, tuple[int, HostsFile]] = {}
    if not directory.is_dir():
        raise ValueError(f"hosts directory {directory} does not exist")
    for path in sorted(p for p in directory.iterdir() if p.is_dir()):
        name = path.name if path.name == "_default" else hosts_dir_namespace_name(path.name)
        if name != "_default" and not HOST_RE.fullmatch(name):
            continue  # not a registry's directory (containerd would never look there)
        rank = 0 if path.name.endswith("_") else 1 if ":" in path.name or name == path.name else 2
        if name in found and found[name][0] <= rank:
            continue
        found[name] = (rank, _load_host_directory(path, name))
    return {name: hosts_file for name, (_rank, hosts_file) in found.items()}


def _load_host_directory(path: Path, name: str) -> HostsFile:
    toml = path / "hosts.toml"
    text = ""
    try:
        text = toml.read_text() if toml.exists() else ""
        if text:
            settings, ignored = read_hosts_toml(text)
            return HostsFile(settings, path, ignored)
        return HostsFile(docker_certificates(path, name), path, from_toml=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{toml if text else path}: {exc}") from None


def docker_certificates(path: Path, name: str) -> NamespaceSettings:
    """containerd's `loadCertFiles`, Docker's layout: every `*.crt` a CA; every
    `*.cert` a client certificate, with the `*.key` of the same name when there is
    one (else the key is in the `.cert`). The server is the namespace's default,
    over https even on loopback when there are certificates (containerd tries https
    first for a host with TLS files)."""
    files = sorted(p for p in path.iterdir() if not p.is_dir())
    ca = [str(p) for p in files if p.name.endswith(".crt")]
    client: list[Any] = []  # as hosts.toml spells it: [cert, key], or the cert alone
    for cert in (p for p in files if p.name.endswith(".cert")):
        key = cert.with_name(cert.name[: -len(".cert")] + ".key")
        client.append([str(cert), str(key)] if key.exists() else str(cert))
    server = f"https://{name}" if (ca or client) and is_local(name) else None
    return NamespaceSettings.model_validate({"server": server, "ca": ca, "client": client})
