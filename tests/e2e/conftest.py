"""Fixtures for end-to-end tests against real peers (see ``tests/peers``).

Session-scoped, because starting them costs time on a 2-core machine: the token
server, one registry per auth mode (token, htpasswd, none), the test image pushed
to each as ``team/app:v1``, skopeo's private configuration, and one containerd
daemon.  Function-scoped: proxyd processes (each with its own cache), podman
storage, and registries a test may stop.

Every test module here sets ``pytestmark = pytest.mark.peers``; a missing peer
binary skips its tests, or fails them under ``PROXYD_REQUIRE_PEERS=1``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    ALICE_CREDS,
    PATH_PREFIX_NAMESPACE,
    REPOSITORY,
    StartProxyd,
)
from tests.peers.clients import Containerd, Podman, Skopeo
from tests.peers.image import BuiltImage, PushedImage, build_image, push_image
from tests.peers.proxyd import ProxydProcess
from tests.peers.registry import Registry
from tests.peers.tokenserver import TokenServer

# -- peers shared by the whole session -------------------------------------------------


@pytest.fixture(scope="session")
def peers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="session")
def skopeo(peers_dir: Path) -> Skopeo:
    return Skopeo(peers_dir / "skopeo")


@pytest.fixture(scope="session")
def image(peers_dir: Path) -> BuiltImage:
    """The image every registry serves as ``team/app:v1``: 3 layers of 256 KiB."""
    return build_image(peers_dir / "image-seed1", seed=1)


@pytest.fixture(scope="session")
def other_image(peers_dir: Path) -> BuiltImage:
    """A different image (another seed): what a wrongly routed request would get."""
    return build_image(peers_dir / "image-seed2", seed=2, layers=2)


@pytest.fixture(scope="session")
def docker_image(peers_dir: Path) -> BuiltImage:
    """A Docker schema2 image (not OCI) for Accept-header negotiation."""
    return build_image(peers_dir / "image-docker", seed=3, media="docker")


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    with TokenServer(public_repos=["public/*"]) as server:
        yield server


@pytest.fixture(scope="session")
def token_registry(peers_dir: Path, token_server: TokenServer) -> Iterator[Registry]:
    """distribution with ``auth.token``: anonymous clients may pull only ``public/*``."""
    with Registry.token(peers_dir / "registry-token", token_server) as registry:
        yield registry


@pytest.fixture(scope="session")
def basic_registry(peers_dir: Path) -> Iterator[Registry]:
    """distribution with ``auth.htpasswd`` (alice/wonderland)."""
    with Registry.htpasswd(peers_dir / "registry-basic") as registry:
        yield registry


@pytest.fixture(scope="session")
def plain_registry(peers_dir: Path) -> Iterator[Registry]:
    """distribution without authentication."""
    with Registry.plain(peers_dir / "registry-plain") as registry:
        yield registry


@pytest.fixture(scope="session")
def token_image(skopeo: Skopeo, image: BuiltImage, token_registry: Registry) -> PushedImage:
    return push_image(skopeo, image, token_registry.host, REPOSITORY, creds=ALICE_CREDS)


@pytest.fixture(scope="session")
def token_docker_image(
    skopeo: Skopeo, docker_image: BuiltImage, token_registry: Registry
) -> PushedImage:
    return push_image(skopeo, docker_image, token_registry.host, "team/docker", creds=ALICE_CREDS)


@pytest.fixture(scope="session")
def basic_image(skopeo: Skopeo, image: BuiltImage, basic_registry: Registry) -> PushedImage:
    return push_image(skopeo, image, basic_registry.host, REPOSITORY, creds=ALICE_CREDS)


@pytest.fixture(scope="session")
def plain_image(skopeo: Skopeo, image: BuiltImage, plain_registry: Registry) -> PushedImage:
    return push_image(skopeo, image, plain_registry.host, REPOSITORY)


@pytest.fixture(scope="session")
def routing_decoy(skopeo: Skopeo, other_image: BuiltImage, plain_registry: Registry) -> PushedImage:
    """Another image, on the plain registry, as ``registry.test/team/app:v1``.

    With the plain registry as proxyd's default namespace, a request for
    ``/v2/registry.test/team/app/…`` that proxyd failed to route by its path prefix
    would get this image, and its digests would give the mistake away.
    """
    repo = f"{PATH_PREFIX_NAMESPACE}/{REPOSITORY}"
    return push_image(skopeo, other_image, plain_registry.host, repo)


@pytest.fixture(scope="session")
def containerd(peers_dir: Path) -> Iterator[Containerd]:
    with Containerd(peers_dir / "containerd") as daemon:
        yield daemon


# -- per test ------------------------------------------------------------------------


@pytest.fixture
def ctr_namespace(request: pytest.FixtureRequest) -> str:
    """A containerd namespace of the test's own, so no content is shared between tests."""
    return re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:60]


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    client = Podman(tmp_path / "podman")
    yield client
    client.close()


@pytest.fixture
def start_proxyd(tmp_path: Path) -> Iterator[StartProxyd]:
    """``start_proxyd(config_toml, extra_args=(), cache_dir=None)`` starts proxyd.

    Each gets a directory (and, unless ``cache_dir`` is given, a cache) of its own;
    all are stopped after the test.  At teardown each proxyd's access log is
    printed, so a failing test shows what proxyd was asked and what it answered.
    """
    started: list[ProxydProcess] = []

    def start(
        config_toml: str, *, extra_args: Sequence[str] = (), cache_dir: Path | None = None
    ) -> ProxydProcess:
        proc = ProxydProcess(
            config_toml,
            tmp_path / f"proxyd-{len(started)}",
            extra_args=extra_args,
            cache_dir=cache_dir,
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        code = proc.stop()
        print(f"--- proxyd {proc.workdir.name} (exit {code}) access log ---")
        print(proc.describe_log(last=60))


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """``registry_factory(kind, **kw)``: a registry of the test's own, stopped after.

    ``kind`` names a ``Registry`` constructor: plain, htpasswd, token, pull_through.
    """
    made: list[Registry] = []

    def make(kind: str = "plain", **kwargs: object) -> Registry:
        workdir = tmp_path / f"registry-{len(made)}-{kind}"
        constructor: Callable[..., Registry] = getattr(Registry, kind)
        registry = constructor(workdir, **kwargs)
        made.append(registry)
        return registry.start()

    yield make
    for registry in made:
        registry.stop()
