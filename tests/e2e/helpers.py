"""What the end-to-end tests share besides fixtures: names, proxyd configurations
in front of a registry, and checks on pulled images and proxyd's access log."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.peers.clients import PulledImage
from tests.peers.image import PushedImage
from tests.peers.proxyd import Host, Namespace, ProxydProcess, proxyd_config
from tests.peers.registry import Registry

ALICE = ("alice", "wonderland")
ALICE_CREDS = "alice:wonderland"
REPOSITORY = "team/app"
# A namespace name without a port, usable as a path prefix (see test_harness).
PATH_PREFIX_NAMESPACE = "registry.test"

StartProxyd = Callable[..., ProxydProcess]


def upstream_config(
    registry: Registry,
    *,
    namespace: str | None = None,
    default_namespace: str | None = None,
    mirrors: Sequence[Host] = (),
    credentials: bool = True,
    extra_namespaces: Sequence[Namespace] = (),
    settings: Mapping[str, Any] | None = None,
) -> str:
    """proxyd in front of ``registry``, holding alice's credentials for it.

    ``namespace`` is the name clients use (default: the registry's ``host:port``);
    it is also the default namespace unless ``default_namespace`` says otherwise.
    Credentials are keyed by the registry's ``host:port`` and, when it differs, by
    the namespace name too.
    """
    name = namespace or registry.host
    creds = {}
    if credentials:
        creds = {registry.host: ALICE, name: ALICE}
    return proxyd_config(
        default_namespace=default_namespace or name,
        namespaces=[Namespace(name, registry.url, tuple(mirrors)), *extra_namespaces],
        credentials=creds,
        settings={"log_level": "info", **(settings or {})},
    )


def assert_same_image(pulled: PulledImage, pushed: PushedImage) -> None:
    assert pulled.manifest_digest == pushed.manifest_digest, "manifest digest differs"
    assert pulled.blob_digests == set(pushed.blob_digests), "blob digests differ"


def blob_gets(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Access-log entries of ``GET …/blobs/sha256:…``."""
    return [e for e in entries if e.get("method") == "GET" and "/blobs/" in str(e.get("path"))]


def assert_blobs_came_through_proxyd(
    proxyd: ProxydProcess, image: PushedImage, namespace: str | None = None
) -> None:
    """Every blob of ``image`` was served by ``proxyd`` with a 200 (routed to
    ``namespace``, when given), as its access log says."""
    wanted = set(image.blob_digests)
    log = proxyd.wait_for_log(
        lambda entries: wanted <= {digest_of(e["path"]) for e in blob_gets(entries)}
    )
    served = {
        digest_of(e["path"])
        for e in blob_gets(log)
        if e.get("status") == 200 and namespace in (None, e.get("namespace"))
    }
    assert wanted <= served, proxyd.describe_log()


def digest_of(path: str) -> str:
    return path.partition("?")[0].rpartition("/")[2]


def wait_until_stored(cache_dir: Path, digest: str, within: float = 10.0) -> Path:
    """The blob's path once proxyd has it in its store: a download releases the last
    byte as soon as the digest is verified, and the fsync and rename follow."""
    algorithm, hex_ = digest.split(":")
    path = cache_dir / "blobs" / algorithm / hex_
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, f"{digest} never reached the store"
        time.sleep(0.01)
    return path
