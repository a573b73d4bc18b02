"""Which namespace a request belongs to, and its repository name upstream.

Order, as containerd and docker clients expect: the `ns` query parameter (containerd's
mirror mode), then a registry host as the first component of the name
(`/v2/ghcr.io/org/app/...`), then the default namespace.
"""

from __future__ import annotations

from proxyd.errors import NameInvalid, NameUnknown
from proxyd.hosts import Namespace, Target
from proxyd.reference import looks_like_host, normalize_repository, validate_name
from proxyd.runtime import RuntimeConfig


def route(runtime: RuntimeConfig, name: str, ns: str | None) -> Target:
    if ns:
        namespace = runtime.namespace(ns)
        if namespace is None:
            raise NameUnknown(f"namespace {ns!r} is not configured in proxyd")
        return _target(namespace, name)
    first, _, rest = name.partition("/")
    if rest and looks_like_host(first):
        namespace = runtime.namespace(first)
        if namespace is not None:
            return _target(namespace, rest)
    default = runtime.namespace(runtime.settings.default_namespace)
    if default is None:  # build_registry refuses such a configuration
        raise NameUnknown("no default namespace is configured")
    try:
        return _target(default, name)
    except NameInvalid:
        if rest and looks_like_host(first):
            raise NameUnknown(f"registry {first!r} is not configured in proxyd") from None
        raise


def _target(namespace: Namespace, name: str) -> Target:
    repository = normalize_repository(namespace.name, validate_name(name))
    return Target(namespace, repository)


def namespace_for(runtime: RuntimeConfig, ns: str | None) -> Namespace:
    """The namespace of a registry-wide call (the catalog): `ns`, else the default."""
    name = ns or runtime.settings.default_namespace
    namespace = runtime.namespace(name)
    if namespace is None:
        raise NameUnknown(f"namespace {name!r} is not configured in proxyd")
    return namespace
