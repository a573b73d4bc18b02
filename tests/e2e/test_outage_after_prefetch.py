"""`proxyd prefetch` prepares a node for an outage: after it prefetched an image into
the running daemon's cache, the upstream (a real distribution 2.8) is stopped, and
skopeo, ctr, podman and docker each pull the image by tag through the daemon.

Each engine sends its own Accept, none of them the one prefetch sent; the tag's one
answer serves them all. `tag_ttl = 0`: every tag request asks the (stopped) upstream
first, so the answers are the stale ones, however old the prefetch.

proxyd's namespace is `docker.io` (docker asks a mirror for Docker Hub names only),
the default namespace, so skopeo, ctr and podman name proxyd itself as the registry.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import REPOSITORY, StartProxyd, assert_same_image
from tests.peers.clients import Containerd, Podman, Skopeo
from tests.peers.dockerd import Dockerd
from tests.peers.image import BuiltImage, PushedImage, push_image
from tests.peers.proxyd import Namespace, ProxydProcess, proxyd_config
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers

TAG_REF = f"{REPOSITORY}:v1"


def prefetched_then_upstream_stopped(
    registry_factory: Callable[..., Registry],
    skopeo: Skopeo,
    image: BuiltImage,
    start_proxyd: StartProxyd,
) -> tuple[ProxydProcess, PushedImage]:
    """A daemon whose cache `proxyd prefetch` warmed (while it served), its upstream
    gone. Nothing has been asked through the daemon before."""
    registry = registry_factory("plain")
    pushed = push_image(skopeo, image, registry.host, REPOSITORY)
    proxyd = start_proxyd(
        proxyd_config(
            default_namespace="docker.io",
            namespaces=[Namespace("docker.io", registry.url, tag_ttl=0)],
            settings={"log_level": "info"},
        )
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "proxyd", "prefetch", "--config", str(proxyd.config_path)),
            *("--cache-dir", str(proxyd.cache_dir), "--log-format", "json", TAG_REF),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    registry.stop()
    return proxyd, pushed


def assert_tags_answered_stale(proxyd: ProxydProcess, engines: int) -> None:
    """Every tag request asked the stopped upstream, then was answered from the cache."""

    def tag_lines(log: list[dict[str, object]]) -> list[dict[str, object]]:
        return [e for e in log if str(e.get("path", "")).endswith("/manifests/v1")]

    log = proxyd.wait_for_log(lambda log: len(tag_lines(log)) >= engines)
    assert {(e["status"], e.get("cache")) for e in tag_lines(log)} == {(200, "stale")}, (
        proxyd.describe_log()
    )


def test_after_prefetch_skopeo_ctr_and_podman_pull_by_tag_with_the_upstream_gone(
    registry_factory: Callable[..., Registry],
    skopeo: Skopeo,
    image: BuiltImage,
    start_proxyd: StartProxyd,
    containerd: Containerd,
    ctr_namespace: str,
    podman: Podman,
) -> None:
    proxyd, pushed = prefetched_then_upstream_stopped(registry_factory, skopeo, image, start_proxyd)
    ref = f"{proxyd.host}/{TAG_REF}"

    assert_same_image(skopeo.pull_to_dir(ref), pushed)

    containerd.images_pull(ref, plain_http=True, namespace=ctr_namespace)
    assert containerd.image_target(ref, namespace=ctr_namespace) == pushed.manifest_digest

    podman.pull(ref, tls_verify=False)
    assert podman.image_digest(ref) == pushed.manifest_digest

    assert_tags_answered_stale(proxyd, engines=3)


def test_after_prefetch_docker_pulls_by_tag_with_the_upstream_gone(
    registry_factory: Callable[..., Registry],
    skopeo: Skopeo,
    image: BuiltImage,
    start_proxyd: StartProxyd,
    tmp_path: Path,
) -> None:
    proxyd, pushed = prefetched_then_upstream_stopped(registry_factory, skopeo, image, start_proxyd)
    daemon_json = tmp_path / "daemon.json"
    proxyd.cli("init", "docker", "--file", str(daemon_json))
    with Dockerd(tmp_path / "dockerd", config_file=daemon_json) as dockerd:
        dockerd.pull(TAG_REF)
        inspected = dockerd.image_inspect(TAG_REF)
    assert inspected["RepoDigests"] == [f"{REPOSITORY}@{pushed.manifest_digest}"]
    assert_tags_answered_stale(proxyd, engines=1)
