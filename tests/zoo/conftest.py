"""Fixtures of the zoo: each registry started on 127.0.0.1 with the images it serves,
skopeo, and a way to pull through a proxyd running in this process.

Every server runs in the test's event loop (pytest-aiohttp's `aiohttp_server`, stopped
with the test); skopeo runs in a worker thread meanwhile, so the loop goes on serving
proxyd and the registries it asks.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.peers.clients import PulledImage, Skopeo
from tests.peers.image import BuiltImage, build_image
from tests.zoo.dockerhub import DockerHub
from tests.zoo.ecr import Ecr
from tests.zoo.ghcr import Ghcr
from tests.zoo.harbor import PROXY_PROJECT, ROBOT, Harbor

LAYER_SIZE = 48 * 1024  # small: the zoo is about what crosses the wire, not how much


class Served(Protocol):
    origin: str

    def app(self) -> web.Application: ...


Serve = Callable[[Served], Awaitable[None]]


@dataclass(frozen=True)
class Images:
    """The images the zoo's registries serve, each of its own bytes."""

    alpine: BuiltImage
    busybox: BuiltImage
    app: BuiltImage
    other: BuiltImage


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    root = tmp_path_factory.mktemp("zoo-images")
    built = [
        build_image(root / name, seed=seed, layers=2, layer_size=LAYER_SIZE)
        for seed, name in enumerate(("alpine", "busybox", "app", "other"), start=41)
    ]
    return Images(*built)


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory: pytest.TempPathFactory) -> Skopeo:
    return Skopeo(tmp_path_factory.mktemp("zoo-skopeo"))


@pytest.fixture
def serve(aiohttp_server: Any) -> Serve:
    """`await serve(peer)`: `peer.app()` on 127.0.0.1, `peer.origin` set to its URL."""

    async def start(peer: Served) -> None:
        server = await aiohttp_server(peer.app(), host="127.0.0.1")
        peer.origin = f"http://127.0.0.1:{server.port}"

    return start


class Puller:
    """skopeo pulling through an in-process proxyd, from a worker thread."""

    def __init__(self, skopeo: Skopeo, workdir: Path) -> None:
        self.skopeo = skopeo
        self.workdir = workdir
        self._pulls = 0

    async def pull(self, proxyd: TestClient[Any, Any], name: str) -> PulledImage:
        """`skopeo copy docker://PROXYD/NAME dir:…`: what landed, every blob checked."""
        return await asyncio.to_thread(
            self.skopeo.pull_to_dir, self._ref(proxyd, name), self._dir()
        )

    def _ref(self, proxyd: TestClient[Any, Any], name: str) -> str:
        return f"127.0.0.1:{proxyd.server.port}/{name}"

    def _dir(self) -> Path:
        self._pulls += 1
        dest = self.workdir / f"pull-{self._pulls}"
        dest.mkdir(parents=True)
        return dest


@pytest.fixture
def skopeo_through(skopeo: Skopeo, tmp_path: Path) -> Puller:
    return Puller(skopeo, tmp_path / "pulls")


@pytest.fixture
async def docker_hub(serve: Serve, images: Images) -> DockerHub:
    """Docker Hub serving `library/alpine:3` and `library/busybox:latest`, public."""
    hub = DockerHub()
    for peer in (hub.auth, hub.storage, hub):
        await serve(peer)
    for repository, image, tag in (
        ("library/alpine", images.alpine, "3"),
        ("library/busybox", images.busybox, "latest"),
    ):
        hub.add(repository, image, tag)
        hub.publish(repository)
    return hub


@pytest.fixture
async def ghcr(serve: Serve, images: Images) -> Ghcr:
    """ghcr.io serving `org/app:v1` and `org/app:v2` (public) and `org/private:v1`."""
    registry = Ghcr()
    for peer in (registry.storage, registry):
        await serve(peer)
    registry.add("org/app", images.app, "v1")
    registry.add("org/app", images.other, "v2")
    registry.add("org/private", images.busybox, "v1")
    registry.publish("org/app")
    return registry


@pytest.fixture
async def ecr(serve: Serve, images: Images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ecr:
    """An ECR registry serving `team/app:v1` and `team/other:v1`, with
    `docker-credential-ecr-login` first on PATH, answering its current password."""
    registry = Ecr(tmp_path / "ecr")
    for peer in (registry.storage, registry):
        await serve(peer)
    registry.add("team/app", images.app, "v1")
    registry.add("team/other", images.other, "v1")
    bin_dir = tmp_path / "bin"
    registry.install_helper(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return registry


@pytest.fixture
async def harbor(serve: Serve, images: Images) -> Harbor:
    """Harbor with the proxy-cache project `dockerhub-proxy` (private: a test may make it
    public) holding `library/alpine:3` and `library/busybox:latest`, and a robot account
    (`ROBOT`) that may pull it."""
    registry = Harbor()
    await serve(registry)
    registry.project(PROXY_PROJECT, public=False)
    registry.robot(*ROBOT)
    registry.add(f"{PROXY_PROJECT}/library/alpine", images.alpine, "3")
    registry.add(f"{PROXY_PROJECT}/library/busybox", images.busybox, "latest")
    return registry
