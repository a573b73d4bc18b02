"""`proxyd serve | check-config | health | prefetch | cache gc|stats | init ENGINE`: the
command line parsed and dispatched. Every command reads the same settings the same way
(flags, then PROXYD_* variables, then the --config file, then the defaults); what
`serve` runs, the daemon's lifecycle, is proxyd.server.daemon's."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxyd import __version__, engines, healthcheck, heap
from proxyd.config import ConfigError, Settings, load_settings
from proxyd.hosts import Namespace
from proxyd.proxies import describe_route
from proxyd.runtime import RuntimeConfig, build_runtime, check_upstream_tls

# The commands that stream blobs: glibc's heap is kept for their buffers (proxyd.heap).
DOWNLOADING = frozenset({"serve", "prefetch"})

EXAMPLES = """\
examples:
  proxyd serve                                   # embedded defaults: Docker Hub on 127.0.0.1:5000
  proxyd serve --config /etc/proxyd/proxyd.toml
  proxyd serve --hosts-dir /etc/containerd/certs.d --docker-config ~/.docker/config.json
  proxyd serve --allow-push ghcr.io --htpasswd /etc/proxyd/htpasswd
  PROXYD_LISTEN=0.0.0.0:5000 proxyd serve
  proxyd check-config --config proxyd.toml
  proxyd health --ready                          # exit 0 when /readyz answers 200, else 1
  proxyd cache stats
  proxyd cache gc --dry-run
  proxyd prefetch --platform linux/amd64 alpine:3.20 ghcr.io/org/app:v1
  proxyd init containerd --print                 # show the hosts.toml files it would write
  proxyd init docker --config /etc/proxyd/proxyd.toml
"""

INIT_HELP = """\
Write the engine's own configuration so it pulls through proxyd, for the namespaces
and the listen address of proxyd's settings (the same flags, PROXYD_* variables and
--config as `proxyd serve`). A file that would change is copied to FILE.bak-<time>
first; a file that already holds the content is left alone.
"""


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also PROXYD_<NAME> and a key of --config)")
    group.add_argument("--config", type=Path, help="TOML file (default: $PROXYD_CONFIG, if set)")
    group.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:5000")
    group.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve HTTPS: PEM cert")
    group.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM key of --tls-cert")
    group.add_argument(
        "--tls-client-ca", type=Path, metavar="FILE", help="require client certs from this CA"
    )
    group.add_argument("--cache-dir", type=Path, metavar="DIR")
    group.add_argument("--hosts-dir", type=Path, metavar="DIR", help="containerd hosts.toml dir")
    group.add_argument("--docker-config", type=Path, metavar="FILE", help="docker config.json")
    group.add_argument("--default-namespace", metavar="NS", help="default docker.io")
    group.add_argument("--log-format", choices=["auto", "json", "console"])
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    group.add_argument(
        "--offline",
        action="store_const",
        const=True,
        help="serve from the cache alone, never ask upstream",
    )
    group.add_argument(
        "--allow-push",
        action="append",
        metavar="NAMESPACE",
        help="forward pushes to NAMESPACE's upstream (repeatable)",
    )
    group.add_argument(
        "--htpasswd", type=Path, metavar="FILE", help="inbound users (bcrypt htpasswd file)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyd",
        description="A local registry mirror for container images (OCI Distribution API).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"proxyd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _settings_flags(serve)
    check = commands.add_parser(
        "check-config", help="validate the configuration and print every host chain"
    )
    _settings_flags(check)
    health = commands.add_parser(
        "health",
        help="exit 0 when the proxyd of these settings answers /healthz, else 1",
        description=healthcheck.DESCRIPTION,
    )
    healthcheck.add_arguments(health)
    _settings_flags(health)
    prefetch = commands.add_parser(
        "prefetch",
        help="pull images into the cache (before an outage or an air gap)",
        description="Resolve each image through its namespace's chain and pull the "
        "manifests of every platform (or those given with --platform) and all their "
        "blobs into the cache. Exit status 1 if any image failed.",
        epilog="examples:\n  proxyd prefetch alpine:3.20 ghcr.io/org/app:v1\n"
        "  proxyd prefetch --platform linux/amd64 --platform linux/arm64 nginx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prefetch.add_argument("images", nargs="+", metavar="IMAGE")
    prefetch.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help="only these platforms of a multi-platform image (repeatable)",
    )
    _settings_flags(prefetch)
    cache = commands.add_parser("cache", help="look at or clean the cache directory")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    cache_gc = cache_commands.add_parser(
        "gc",
        help="evict by [cache] max_size and max_age now",
        description="Evict least recently used blobs (and their links) until the store "
        "fits [cache] max_size, and those unused longer than max_age; blobs used in the "
        "last five minutes stay. Safe while proxyd serves.",
    )
    cache_gc.add_argument(
        "--dry-run", action="store_true", help="list what would go; remove nothing"
    )
    _settings_flags(cache_gc)
    stats = cache_commands.add_parser("stats", help="size, entries and top repositories")
    _settings_flags(stats)
    init = commands.add_parser(
        "init",
        help="point containerd, docker or podman at proxyd",
        description=INIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    engines_parsers = init.add_subparsers(dest="engine", required=True, metavar="ENGINE")
    for engine, option, default, what in (
        ("containerd", "--dir", engines.DEFAULT_CONTAINERD_DIR, "DIR/<registry>/hosts.toml"),
        ("docker", "--file", engines.DEFAULT_DOCKER_FILE, "docker's daemon.json"),
        ("podman", "--file", engines.DEFAULT_PODMAN_FILE, "a registries.conf drop-in"),
    ):
        sub = engines_parsers.add_parser(
            engine, help=f"write {what}", description=INIT_HELP + f"\nThis writes {what}."
        )
        sub.add_argument(
            option,
            dest="target",
            type=Path,
            default=default,
            metavar=option.strip("-").upper(),
            help=f"{what} (default {default})",
        )
        sub.add_argument(
            "--print",
            dest="print_only",
            action="store_true",
            help="write nothing; print each file's path (stderr) and content (stdout)",
        )
        _settings_flags(sub)
    return parser


def load(args: argparse.Namespace) -> RuntimeConfig:
    runtime = build_runtime(load_args_settings(args))
    if args.command in ("serve", "check-config"):
        check_upstream_tls(runtime)  # the commands that connect, or say whether they could
    return runtime


def load_args_settings(args: argparse.Namespace) -> Settings:
    config = args.config or (
        Path(os.environ["PROXYD_CONFIG"]) if os.environ.get("PROXYD_CONFIG") else None
    )
    flags: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "listen",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "cache_dir",
            "hosts_dir",
            "docker_config",
            "default_namespace",
            "log_format",
            "log_level",
            "offline",
            "allow_push",
            "htpasswd",
        )
    }
    return load_settings(config, **flags)


def check_config(runtime: RuntimeConfig) -> int:
    settings = runtime.settings
    print(f"listen:            {settings.listen}")
    if settings.tls_cert is not None:
        clients = f", client certificates from {settings.tls_client_ca}"
        print(f"tls:               {settings.tls_cert}{clients if settings.tls_client_ca else ''}")
    print(f"cache directory:   {settings.cache_dir}")
    print(f"default namespace: {settings.default_namespace}")
    if runtime.inbound_users is not None:
        print(
            f"inbound users:     {len(runtime.inbound_users)} from {settings.htpasswd}, "
            f"required for {runtime.auth_required}"
        )
    if settings.cluster is not None:
        cluster = settings.cluster
        print(
            f"fleet:             this node is {cluster.advertise}, coordinating through "
            f"{_redis_host(cluster.redis_url)}, streaming a blob to {cluster.fanout} peers at "
            "most; the secret read"
        )
    for source, key in runtime.ignored_keys:
        print(f"proxyd: warning: {source}: unknown key {key!r} ignored", file=sys.stderr)
    for name, namespace in sorted(runtime.namespaces.items()):
        print(f"\nnamespace {name}  (from {namespace.source})")
        for position, host in enumerate(namespace.hosts, 1):
            auth = "credentials" if runtime.credential_for(host.host) else "anonymous"
            way = describe_route(host.proxy, runtime.proxy_env, host.origin)
            print(f"  {position}. {host.describe()}, {auth}{'' if way == 'direct' else ', ' + way}")
        writes = [
            name
            for name, allowed in (
                ("pushes", runtime.push_allowed(namespace)),
                ("deletes", namespace.allow_delete),
            )
            if allowed
        ]
        if writes:
            push_host = namespace.push_host
            where = f"to {push_host.origin}" if push_host else "but no host has the push capability"
            print(f"  {' and '.join(writes)} allowed {where}")
        for sentence in explain_chain(namespace):
            print(f"  {sentence}")
    if runtime.fallback is not None:
        print("\nany other namespace: hosts_dir/_default/hosts.toml")
    elif settings.allow_unconfigured_namespaces:
        print("\nany other namespace: its registry host itself (allow_unconfigured_namespaces)")
    return 0


def _redis_host(url: str) -> str:
    """A Redis URL without its password, as check-config may print it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


def explain_chain(namespace: Namespace) -> list[str]:
    """The chain in words: who is asked for what, in which order."""
    from proxyd.hosts import Capability

    def order(capability: Capability) -> str:
        hosts = [h.host for h in namespace.hosts_for(capability)]
        return ", then ".join(hosts) if hosts else "no host (such requests fail)"

    return [
        f"Blobs and manifests by digest are asked of {order(Capability.PULL)};",
        f"tags are resolved by {order(Capability.RESOLVE)}, and stay fresh for "
        f"{namespace.tag_ttl:g} s.",
    ]


def init(runtime: RuntimeConfig, engine: str, target: Path, print_only: bool) -> int:
    """Render the engine's files, then print them or write them (with backups)."""
    try:
        if engine == "containerd":
            plan = engines.plan_containerd(runtime, target)
        elif engine == "docker":
            plan = engines.plan_docker(runtime, target, engines.read_existing(target))
        else:
            plan = engines.plan_podman(runtime, target)
        changed = False  # the next steps are news only once a file changed
        if print_only:
            _print_plan(plan)
        else:
            changed = _write_plan(plan)
    except engines.InitError as exc:
        print(f"proxyd: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    for note in (*plan.notes, *(plan.next_steps if changed else ())):
        print(f"note: {note}", file=sys.stderr)
    return 0


def _print_plan(plan: engines.Plan) -> None:
    """Each file's path (and whether it would change) on stderr, its text on stdout,
    so `--print > FILE` keeps the content alone."""
    for rendered in plan.files:
        same = engines.read_existing(rendered.path) == rendered.text
        sys.stdout.flush()
        state = "unchanged" if same else "would write"
        print(f"==> {rendered.path} ({state}) <==", file=sys.stderr, flush=True)
        sys.stdout.write(rendered.text)


def _write_plan(plan: engines.Plan) -> bool:
    changed = False
    for rendered in plan.files:
        written = engines.write_file(rendered.path, rendered.text)
        backup = f" (previous content in {written.backup})" if written.backup else ""
        print(f"{written.outcome.value:9} {written.path}{backup}")
        changed |= written.outcome is not engines.Outcome.UNCHANGED
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":  # the settings alone, no registry; exit 0 or 1, never 2
        return healthcheck.main(lambda: load_args_settings(args), args)
    try:
        runtime = load(args)
    except ConfigError as exc:
        print(f"proxyd: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        return check_config(runtime)
    if args.command == "init":
        return init(runtime, args.engine, args.target, args.print_only)
    if args.command in DOWNLOADING:
        heap.keep_heap()  # before the first download's buffers
    if args.command == "prefetch":
        return prefetch_command(runtime, args.images, args.platform)
    if args.command == "cache":
        return cache_command(runtime, args.cache_command, dry_run=getattr(args, "dry_run", False))
    from proxyd.server.daemon import serve  # aiohttp and the app: for this command only

    return serve(runtime)


def prefetch_command(runtime: RuntimeConfig, images: list[str], platforms: list[str]) -> int:
    from proxyd.core import open_core
    from proxyd.inventory import human_bytes
    from proxyd.log import configure
    from proxyd.prefetch import BarProgress, LogProgress, Progress, prefetch

    settings = runtime.settings
    configure(settings.log_level, settings.log_format)
    bars = sys.stderr.isatty()

    async def run() -> int:
        # beside a serving daemon: its tmp/ and its place in the fleet are its own
        async with open_core(runtime, clear_tmp=False, join_fleet=False) as core:
            progress: Progress
            if bars:
                with BarProgress() as progress:
                    summary = await prefetch(
                        core.resolver, runtime, images, platforms=platforms, progress=progress
                    )
            else:
                progress = LogProgress()
                summary = await prefetch(
                    core.resolver, runtime, images, platforms=platforms, progress=progress
                )
        for failure in summary.failures:
            print(f"proxyd: {failure}", file=sys.stderr)
        print(
            f"{summary.images} of {len(images)} images, {summary.manifests} manifests; "
            f"{summary.blobs_fetched} blobs fetched ({human_bytes(summary.bytes_fetched)}), "
            f"{summary.blobs_cached} already cached; {summary.seconds:.1f} s"
        )
        return 1 if summary.failures else 0

    return asyncio.run(run())


def cache_command(runtime: RuntimeConfig, action: str, *, dry_run: bool) -> int:
    from proxyd.evict import Evictor
    from proxyd.inventory import describe, hit_ratio, human_bytes, scrape_metrics, take_inventory
    from proxyd.store import BlobStore

    settings = runtime.settings
    store = BlobStore(settings.cache_dir)
    if not store.is_initialised():
        print(f"proxyd: {settings.cache_dir} holds no cache yet", file=sys.stderr)
        return 0 if action == "stats" else 1
    if action == "stats":
        print(f"cache directory: {settings.cache_dir}")
        for line in describe(take_inventory(store)):
            print(line)
        metrics = None if settings.tls_cert else scrape_metrics(settings.listen)
        ratio = hit_ratio(metrics) if metrics else None
        if ratio is not None:
            print(f"hit ratio:       {ratio[0]:.1%} of {ratio[1]} lookups since proxyd started")
        else:
            print(f"hit ratio:       n/a (no proxyd with lookups answers on {settings.listen})")
        return 0
    evictor = Evictor(store, max_size=settings.cache.max_size, max_age=settings.cache.max_age)
    if not evictor.enabled:
        print("proxyd: no [cache] max_size or max_age is set: nothing to evict", file=sys.stderr)
        return 0
    chosen = evictor.collect(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for stored in chosen.remove:
        print(f"{verb} {stored.digest} ({human_bytes(stored.size)})")
    print(
        f"{verb} {len(chosen.remove)} of {chosen.entries} blobs, "
        f"{human_bytes(chosen.freed)} of {human_bytes(chosen.total)}"
    )
    return 0
