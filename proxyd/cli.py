"""`proxyd serve | check-config`: every command reads the same settings the same way
(flags, then PROXYD_* variables, then the --config file, then the defaults)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxyd import __version__
from proxyd.config import ConfigError, Registry, build_registry, load_settings, split_listen

EXAMPLES = """\
examples:
  proxyd serve                                   # embedded defaults: Docker Hub on 127.0.0.1:5000
  proxyd serve --config /etc/proxyd/proxyd.toml
  proxyd serve --hosts-dir /etc/containerd/certs.d --docker-config ~/.docker/config.json
  PROXYD_LISTEN=0.0.0.0:5000 proxyd serve
  proxyd check-config --config proxyd.toml
"""


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also PROXYD_<NAME> and a key of --config)")
    group.add_argument("--config", type=Path, help="TOML file (default: $PROXYD_CONFIG, if set)")
    group.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:5000")
    group.add_argument("--cache-dir", type=Path, metavar="DIR")
    group.add_argument("--hosts-dir", type=Path, metavar="DIR", help="containerd hosts.toml dir")
    group.add_argument("--docker-config", type=Path, metavar="FILE", help="docker config.json")
    group.add_argument("--default-namespace", metavar="NS", help="default docker.io")
    group.add_argument("--log-format", choices=["auto", "json", "console"])
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


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
    return parser


def load(args: argparse.Namespace) -> Registry:
    config = args.config or (
        Path(os.environ["PROXYD_CONFIG"]) if os.environ.get("PROXYD_CONFIG") else None
    )
    flags: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "listen",
            "cache_dir",
            "hosts_dir",
            "docker_config",
            "default_namespace",
            "log_format",
            "log_level",
        )
    }
    return build_registry(load_settings(config, **flags))


def check_config(registry: Registry) -> int:
    settings = registry.settings
    print(f"listen:            {settings.listen}")
    print(f"cache directory:   {settings.cache_dir}")
    print(f"default namespace: {settings.default_namespace}")
    for name, namespace in sorted(registry.namespaces.items()):
        print(f"\nnamespace {name}  (from {namespace.source})")
        for position, host in enumerate(namespace.hosts, 1):
            auth = "credentials" if registry.credential_for(host.host) else "anonymous"
            print(f"  {position}. {host.describe()}, {auth}")
    if registry.fallback is not None:
        print("\nany other namespace: hosts_dir/_default/hosts.toml")
    elif settings.allow_unconfigured_namespaces:
        print("\nany other namespace: its registry host itself (allow_unconfigured_namespaces)")
    return 0


def serve(registry: Registry) -> int:
    from aiohttp import web

    from proxyd.log import configure
    from proxyd.server import AccessLogger, create_app

    settings = registry.settings
    configure(settings.log_level, settings.log_format)
    import structlog

    log = structlog.get_logger("proxyd")
    host, port = split_listen(settings.listen)
    log.info(
        "starting",
        listen=settings.listen,
        cache_dir=str(settings.cache_dir),
        namespaces=sorted(registry.namespaces),
    )
    try:
        web.run_app(
            create_app(registry),
            host=host,
            port=port,
            print=None,
            access_log=logging.getLogger("proxyd.access"),
            access_log_class=AccessLogger,
            shutdown_timeout=10,
            handle_signals=True,
        )
    except OSError as exc:
        log.error("cannot listen", listen=settings.listen, error=exc.strerror or str(exc))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        registry = load(args)
    except ConfigError as exc:
        print(f"proxyd: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        return check_config(registry)
    return serve(registry)
