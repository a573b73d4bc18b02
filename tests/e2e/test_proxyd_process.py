"""proxyd as an operating-system process: stopping, crashing, starting again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import ALICE_CREDS, StartProxyd, blob_gets, upstream_config
from tests.peers.clients import Skopeo
from tests.peers.image import BuiltImage, PushedImage
from tests.peers.proxyd import CLOSED_PORT_URL
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers


def test_sigterm_after_a_pull_exits_cleanly(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry))
    skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")

    assert proxyd.stop(grace=5) == 0, proxyd.stderr_text()[-3000:]


def test_cache_survives_sigkill_and_serves_while_upstream_is_down(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    registry_factory: Callable[..., Registry],
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    registry = registry_factory("htpasswd")
    skopeo.push(image.source, f"{registry.host}/team/app:v1", creds=ALICE_CREDS)
    cache = tmp_path / "shared-cache"
    first = start_proxyd(upstream_config(registry), cache_dir=cache)
    skopeo.pull_to_dir(f"{first.host}/team/app:v1")
    first.wait_for_log(lambda log: len(blob_gets(log)) >= len(image.blob_digests))
    first.kill()
    registry.stop()

    second = start_proxyd(upstream_config(registry), cache_dir=cache)
    pulled = skopeo.pull_to_dir(f"{second.host}/team/app@{image.manifest_digest}")

    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.blob_digests == set(image.blob_digests)
    log = second.wait_for_log(lambda log: len(blob_gets(log)) >= len(image.blob_digests))
    assert {e.get("cache") for e in blob_gets(log)} == {"hit"}, second.describe_log()


def test_a_started_daemon_learns_its_token_upstreams_challenge_before_the_first_pull(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    """`proxyd serve` asks each configured host `GET /v2/` at start (proxyd/preconnect.py):
    the real distribution answers 401 with its bearer challenge, which the first pull's
    requests then meet with a token at once. The harness's docker.io, a closed port, is
    a warning and nothing more."""
    proxyd = start_proxyd(upstream_config(token_registry))
    (asked,) = proxyd.wait_for_event("preconnect")
    assert (asked["host"], asked["status"], asked["challenge"]) == (
        token_registry.url,
        401,
        "bearer",
    )

    skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")

    assert proxyd.request("GET", "/readyz").status == 200
    failed = [e["host"] for e in proxyd.logs() if e.get("event") == "preconnect.failed"]
    assert failed == [CLOSED_PORT_URL]
