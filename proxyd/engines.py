"""`proxyd init containerd|docker|podman`: the engine's own configuration files that make
it pull through proxyd.

The renderers are pure (a `RuntimeConfig` and existing file text in, new file text out), so
every rule is tested without touching `/etc`. `write_file` is the one place that
writes: it never overwrites silently (the old file is copied to `FILE.bak-<UTC time>`
first), leaves a file whose content would not change untouched, and replaces a file
atomically, so an engine never reads half of one.

What each engine can express:

- containerd (`certs.d/<namespace>/hosts.toml`): every namespace, with proxyd as a
  mirror of the upstream `server`; containerd names the namespace in `?ns=`, which is
  how proxyd routes it.
- docker (`daemon.json` `registry-mirrors`): Docker Hub only; docker sends a mirror no
  namespace, so proxyd must have `docker.io` as its default namespace.
- podman and CRI-O (`registries.conf.d/*.conf`): every namespace proxyd can tell from
  the request path: the default namespace as proxyd's root, the others as a path
  prefix (`127.0.0.1:5000/ghcr.io`), which clients refuse for names with a port.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from proxyd.config import split_listen
from proxyd.hosts import Namespace, RegistryHost
from proxyd.reference import DOCKER_HUB, looks_like_host
from proxyd.runtime import RuntimeConfig

DEFAULT_CONTAINERD_DIR = Path("/etc/containerd/certs.d")
DEFAULT_DOCKER_FILE = Path("/etc/docker/daemon.json")
DEFAULT_PODMAN_FILE = Path("/etc/containers/registries.conf.d/proxyd.conf")
CONTAINERD_DEFAULT_DIR = "_default"  # containerd's hosts.toml for any other registry


class InitError(Exception):
    """The engine's configuration cannot be written as asked: the message says why."""


@dataclass(frozen=True)
class Rendered:
    """What one engine file should hold, and what the user should know about it."""

    path: Path
    text: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Every file `proxyd init ENGINE` writes, and what to do afterwards."""

    files: tuple[Rendered, ...]
    notes: tuple[str, ...] = ()
    next_steps: tuple[str, ...] = ()


# -- addresses -----------------------------------------------------------------------


def client_address(listen: str) -> str:
    """`host:port` a client on this machine connects to for proxyd's `listen`.

    A wildcard is no address to connect to: `0.0.0.0` becomes `127.0.0.1` and `::`
    becomes `[::1]` (asyncio binds `::` to IPv6 only, so 127.0.0.1 would not answer).
    """
    host, port = split_listen(listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def mirror_url(listen: str, *, tls: bool = False) -> str:
    """proxyd's URL as a mirror: https when proxyd serves TLS (`tls_cert`)."""
    return f"{'https' if tls else 'http'}://{client_address(listen)}"


def serves_tls(runtime: RuntimeConfig) -> bool:
    return runtime.settings.tls_cert is not None


def _trust_note(runtime: RuntimeConfig, engine: str, where: str) -> str:
    clients = (
        f"; proxyd also requires a client certificate from {runtime.settings.tls_client_ca}, "
        f"which {engine} must present"
        if runtime.settings.tls_client_ca is not None
        else ""
    )
    return (
        f"proxyd serves HTTPS: {engine} must trust the CA that issued proxyd's tls_cert "
        f"({where}, or the system's CA store){clients}."
    )


def _toml_string(value: str) -> str:
    # A JSON string (ASCII only, `\"`, `\\`, `\uXXXX`) is a TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def _upstream(namespace: Namespace) -> RegistryHost:
    return next(h for h in reversed(namespace.hosts) if not h.is_mirror)


def server_url(host: RegistryHost) -> tuple[str, bool]:
    """The hosts.toml `server` for an upstream, and whether it needs `override_path`.

    containerd appends `/v2` to the URL's path unless it already ends so; an API root
    that does not end in `/v2` is only reachable with `override_path = true`.
    """
    if host.path == "/v2":
        return host.origin, False
    return f"{host.origin}{host.path}", not host.path.endswith("/v2")


# -- containerd ----------------------------------------------------------------------


def containerd_directory_names(namespace: str) -> list[str]:
    """The directories containerd's `hostPaths` looks in, in its order: for
    `host:port`, `host_port_` first (the spelling every filesystem allows), then
    `host:port` itself."""
    if namespace == CONTAINERD_DEFAULT_DIR:
        return [namespace]
    head, sep, port = namespace.rpartition(":")
    if sep and head and port.isdigit():
        return [f"{head}_{port}_", namespace]
    return [namespace]


def containerd_directory(root: Path, namespace: str) -> Path:
    """The directory containerd will read for `namespace`: the first existing one in
    its lookup order (so a file is never written where another shadows it), else the
    first of that order."""
    names = containerd_directory_names(namespace)
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root / names[0]


def render_hosts_toml(namespace: Namespace | None, listen: str, *, tls: bool = False) -> str:
    """One containerd hosts.toml: proxyd as a pull-and-resolve mirror in front of the
    namespace's upstream; `namespace=None` renders `_default` (no `server`: containerd
    then uses the registry named in the image reference)."""
    mirror = mirror_url(listen, tls=tls)
    what = namespace.name if namespace else "any registry without a directory of its own"
    lines = [
        f"# Written by `proxyd init containerd`: {what} through proxyd at {mirror}.",
        "# containerd asks the mirror first, with ?ns=<registry> (how proxyd routes it),",
        "# and the server itself only when proxyd fails.",
    ]
    if namespace is not None:
        url, override_path = server_url(_upstream(namespace))
        lines.append(f"server = {_toml_string(url)}")
        if override_path:
            lines.append("override_path = true")
    lines += [
        "",
        f"[host.{_toml_string(mirror)}]",
        '  capabilities = ["pull", "resolve"]',
    ]
    return "\n".join(lines) + "\n"


def plan_containerd(runtime: RuntimeConfig, root: Path) -> Plan:
    """`root/<namespace>/hosts.toml` for every configured namespace, and
    `root/_default/hosts.toml` when proxyd serves namespaces it was not told of."""
    hosts_dir = runtime.settings.hosts_dir
    if hosts_dir is not None and _same_path(hosts_dir, root):
        raise InitError(
            f"proxyd reads its own host chains from {root} (hosts_dir): writing proxyd "
            "there as a mirror would make proxyd its own mirror. Give containerd another "
            "config_path, or proxyd another hosts_dir."
        )
    listen = runtime.settings.listen
    tls = serves_tls(runtime)
    files = [
        Rendered(
            containerd_directory(root, name) / "hosts.toml",
            render_hosts_toml(runtime.namespaces[name], listen, tls=tls),
        )
        for name in sorted(runtime.namespaces)
    ]
    if runtime.fallback is not None or runtime.settings.allow_unconfigured_namespaces:
        files.append(
            Rendered(
                root / CONTAINERD_DEFAULT_DIR / "hosts.toml",
                render_hosts_toml(None, listen, tls=tls),
            )
        )
    next_steps = (
        f'containerd reads these files when its config.toml has config_path = "{root.absolute()}" '
        '(version 2: [plugins."io.containerd.grpc.v1.cri".registry]); changes below that '
        "directory need no restart.",
        f"ctr reads them with: ctr images pull --hosts-dir {root.absolute()} IMAGE",
    )
    notes = []
    if tls:
        where = f'ca = "CA.pem" in each [host."{mirror_url(listen, tls=tls)}"] table'
        notes.append(_trust_note(runtime, "containerd", where))
    return Plan(tuple(files), notes=tuple(notes), next_steps=next_steps)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


# -- docker --------------------------------------------------------------------------


def render_daemon_json(existing: str | None, mirror: str, *, where: str = "daemon.json") -> str:
    """`existing` with `mirror` first in `registry-mirrors`; every other key and
    mirror kept. An existing file that already names the mirror is returned as is."""
    data: object = {}
    if existing is not None and existing.strip():
        try:
            data = json.loads(existing)
        except json.JSONDecodeError as exc:
            raise InitError(f"{where} is not JSON ({exc}); fix it or move it away") from None
    if not isinstance(data, dict):
        raise InitError(f"{where} must hold a JSON object")
    mirrors = data.get("registry-mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise InitError(f'{where}: "registry-mirrors" must be a list of URLs')
    if any(m.rstrip("/") == mirror for m in mirrors):
        return existing if existing is not None else ""
    data["registry-mirrors"] = [mirror, *mirrors]
    return json.dumps(data, indent=2) + "\n"


def plan_docker(runtime: RuntimeConfig, path: Path, existing: str | None) -> Plan:
    settings = runtime.settings
    if settings.default_namespace != DOCKER_HUB:
        raise InitError(
            "docker sends a mirror Docker Hub pulls without naming the registry, so proxyd "
            f"would route them to its default namespace {settings.default_namespace!r}; "
            f'set default_namespace = "{DOCKER_HUB}" to use proxyd as docker\'s mirror'
        )
    mirror = mirror_url(settings.listen, tls=serves_tls(runtime))
    notes = []
    others = sorted(n for n in runtime.namespaces if n != DOCKER_HUB)
    if others:
        notes.append(
            "docker uses a mirror for Docker Hub only: pulls from "
            f"{', '.join(others)} go to those registries directly, not through proxyd."
        )
    host, _ = split_listen(client_address(settings.listen))
    if serves_tls(runtime):
        where = f"/etc/docker/certs.d/{client_address(settings.listen)}/ca.crt"
        notes.append(_trust_note(runtime, "docker", where))
    elif host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        notes.append(
            "No insecure-registries entry is needed: docker allows plain HTTP to "
            "127.0.0.0/8 and ::1."
        )
    rendered = Rendered(path, render_daemon_json(existing, mirror, where=str(path)))
    return Plan(
        (rendered,),
        notes=tuple(notes),
        next_steps=("Restart docker to read it: systemctl restart docker",),
    )


# -- podman / CRI-O ------------------------------------------------------------------


def podman_mirror_location(runtime: RuntimeConfig, namespace: str) -> str | None:
    """Where podman should ask proxyd for `namespace`, or None when it cannot say.

    podman sends a mirror the repository alone, so the default namespace is proxyd's
    root; another namespace must be the first path component, which proxyd routes by
    only when it looks like a registry host and which clients refuse with a port.
    """
    address = client_address(runtime.settings.listen)
    if namespace == runtime.settings.default_namespace:
        return address
    if looks_like_host(namespace) and ":" not in namespace and namespace == namespace.lower():
        return f"{address}/{namespace}"
    return None


def render_registries_conf(runtime: RuntimeConfig) -> tuple[str, tuple[str, ...]]:
    """A registries.conf drop-in with proxyd as the mirror of each namespace, and
    notes for the namespaces it cannot cover."""
    tls = serves_tls(runtime)
    mirror = mirror_url(runtime.settings.listen, tls=tls)
    lines = [
        f"# Written by `proxyd init podman`: pull through proxyd at {mirror}.",
        "# podman, skopeo, buildah and CRI-O ask the mirror first and the registry itself",
        "# only when proxyd fails. "
        + ("proxyd serves HTTPS." if tls else "proxyd serves plain HTTP, hence insecure = true."),
    ]
    notes = []
    if tls:
        where = f"/etc/containers/certs.d/{client_address(runtime.settings.listen)}/ca.crt"
        notes.append(_trust_note(runtime, "podman", where))
    default = runtime.settings.default_namespace
    ordered = sorted(runtime.namespaces, key=lambda n: (n != default, n))
    for name in ordered:
        location = podman_mirror_location(runtime, name)
        if location is None:
            notes.append(
                f"{name}: not written; podman can name it to proxyd only as a path prefix, "
                "which a registry with a port cannot be. Make it proxyd's default_namespace, "
                "or give the namespace a name without a port."
            )
            continue
        lines += ["", "[[registry]]", f"location = {_toml_string(name)}"]
        if _upstream(runtime.namespaces[name]).scheme == "http":
            lines.append("insecure = true")
        lines += [
            "",
            "[[registry.mirror]]",
            f"location = {_toml_string(location)}",
            *(() if tls else ("insecure = true",)),
        ]
    if runtime.fallback is not None or runtime.settings.allow_unconfigured_namespaces:
        notes.append(
            "registries.conf has no catch-all mirror: only the namespaces above are "
            "pulled through proxyd."
        )
    return "\n".join(lines) + "\n", tuple(notes)


def plan_podman(runtime: RuntimeConfig, path: Path) -> Plan:
    text, notes = render_registries_conf(runtime)
    return Plan(
        (Rendered(path, text),),
        notes=notes,
        next_steps=("podman reads it at its next command; CRI-O needs a restart.",),
    )


# -- writing -------------------------------------------------------------------------


class Outcome(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Written:
    path: Path
    outcome: Outcome
    backup: Path | None = None


def read_existing(path: Path) -> str | None:
    """The file's text, or None when there is no file."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None  # a parent is a file: write_file says so
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise InitError(f"cannot read {path}: {reason}") from None


def backup_path(path: Path, now: datetime) -> Path:
    """`FILE.bak-<UTC time>`, with a counter when that exists. The suffix keeps
    a backup out of what engines read (`*.conf`, `hosts.toml`, `daemon.json`)."""
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak-{stamp}-{counter}")
        counter += 1
    return candidate


def write_file(path: Path, text: str, *, now: datetime | None = None) -> Written:
    """Write `text` to `path` unless it already holds it; back up what was there.

    The new content goes to a temporary file beside `path`, then replaces it in one
    rename, keeping the old file's permission bits (new files: 0644).
    """
    existing = read_existing(path)
    if existing == text:
        return Written(path, Outcome.UNCHANGED)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise InitError(f"cannot write {path}: {parent} is not a directory")
    tmp = path.with_name(f".{path.name}.proxyd-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backup = None
        if existing is not None:
            backup = backup_path(path, now or datetime.now(UTC))
            shutil.copy2(path, backup)
        mode = path.stat().st_mode & 0o7777 if existing is not None else 0o644
        with open(tmp, "w") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        at = f" ({exc.filename})" if exc.filename and Path(exc.filename) != path else ""
        raise InitError(f"cannot write {path}: {exc.strerror or exc}{at}") from None
    return Written(path, Outcome.UPDATED if existing is not None else Outcome.CREATED, backup)
