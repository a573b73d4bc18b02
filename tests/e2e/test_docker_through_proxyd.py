"""The real docker engine (dockerd 20.10) pulls through proxyd as its registry mirror,
configured by the ``daemon.json`` that ``proxyd init docker`` wrote.

docker asks a mirror for Docker Hub names only, so proxyd's docker.io namespace is the
token-auth registry here, where ``team/app`` is private: docker holds no credentials,
and its fallback to registry-1.docker.io cannot be reached, so an image docker has
came through proxyd.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    REPOSITORY,
    StartProxyd,
    assert_blobs_came_through_proxyd,
    blob_gets,
    digest_of,
    upstream_config,
)
from tests.peers.dockerd import Dockerd
from tests.peers.image import PushedImage
from tests.peers.proxyd import ProxydProcess
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers

REF = f"{REPOSITORY}:v1"  # docker.io/team/app:v1


@pytest.fixture
def proxyd(start_proxyd: StartProxyd, token_registry: Registry) -> ProxydProcess:
    return start_proxyd(upstream_config(token_registry, namespace="docker.io"))


@pytest.fixture
def dockerd(proxyd: ProxydProcess, tmp_path: Path) -> Iterator[Dockerd]:
    daemon_json = tmp_path / "daemon.json"
    done = proxyd.cli("init", "docker", "--file", str(daemon_json))
    assert str(daemon_json) in done.stdout, done.describe()
    with Dockerd(tmp_path / "dockerd", config_file=daemon_json) as daemon:
        yield daemon


def test_docker_pulls_through_proxyd_cold_then_warm_with_the_daemon_json_init_wrote(
    dockerd: Dockerd, proxyd: ProxydProcess, token_image: PushedImage
) -> None:
    written = json.loads(dockerd.config_file.read_text())
    assert written["registry-mirrors"] == [proxyd.url]
    assert dockerd.info()["RegistryConfig"]["Mirrors"] == [f"{proxyd.url}/"]

    dockerd.pull(REF)
    cold = dockerd.image_inspect(REF)
    assert_blobs_came_through_proxyd(proxyd, token_image)
    served_cold = len(blob_gets(proxyd.access_log()))

    dockerd.rmi(REF)
    dockerd.pull(REF)
    warm = dockerd.image_inspect(REF)

    for inspected in (cold, warm):
        assert inspected["RepoDigests"] == [f"{REPOSITORY}@{token_image.manifest_digest}"]
        assert inspected["Id"] == token_image.image.config_digest
    # rmi removed the config and the layers: docker fetched each again, from the cache.
    wanted = set(token_image.blob_digests)

    def warm_blobs(log: list[dict[str, object]]) -> list[dict[str, object]]:
        return [e for e in blob_gets(log)[served_cold:] if e.get("status") == 200]

    log = proxyd.wait_for_log(
        lambda log: wanted <= {digest_of(str(e["path"])) for e in warm_blobs(log)}
    )
    assert {digest_of(str(e["path"])) for e in warm_blobs(log)} == wanted, proxyd.describe_log()
    assert {e.get("cache") for e in warm_blobs(log)} == {"hit"}, proxyd.describe_log()
