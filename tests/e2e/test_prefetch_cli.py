"""`proxyd prefetch` warms a cache from the real registry; a proxyd started on that
cache then serves the image without asking the registry for a blob."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import StartProxyd, blob_gets, upstream_config, wait_until_stored
from tests.peers.clients import Skopeo
from tests.peers.image import PushedImage
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers


def test_prefetch_warms_the_cache_a_later_pull_is_served_from(
    tmp_path: Path,
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    config = tmp_path / "proxyd.toml"
    config.write_text(upstream_config(token_registry))
    cache = tmp_path / "cache"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxyd",
            "prefetch",
            "--config",
            str(config),
            "--cache-dir",
            str(cache),
            "--log-format",
            "json",
            token_image.ref,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "1 of 1 images" in done.stdout
    assert f"{len(token_image.blob_digests)} blobs fetched" in done.stdout

    served_before = len(token_registry.blob_gets())
    proxyd = start_proxyd(upstream_config(token_registry), cache_dir=cache)
    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")
    assert pulled.blob_digests == set(token_image.blob_digests)
    log = proxyd.wait_for_log(
        lambda entries: len(blob_gets(entries)) >= len(token_image.blob_digests)
    )
    assert {e.get("cache") for e in blob_gets(log)} == {"hit"}
    assert len(token_registry.blob_gets()) == served_before


def test_prefetch_of_an_unknown_image_fails_with_a_message(
    tmp_path: Path, token_registry: Registry
) -> None:
    config = tmp_path / "proxyd.toml"
    config.write_text(upstream_config(token_registry))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxyd",
            "prefetch",
            "--config",
            str(config),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--log-format",
            "json",
            f"{token_registry.host}/team/nothing:v9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "team/nothing:v9" in done.stderr
    assert "Traceback" not in done.stderr


def test_cache_stats_reads_the_hit_ratio_of_the_running_proxyd(
    tmp_path: Path,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry))
    layer = token_image.image.layer_digests[0]
    for _ in range(4):  # one miss, three hits
        assert proxyd.request("GET", f"/v2/{token_image.repository}/blobs/{layer}").status == 200
        wait_until_stored(proxyd.cache_dir, layer)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxyd",
            "cache",
            "stats",
            "--cache-dir",
            str(proxyd.cache_dir),
            "--listen",
            f"127.0.0.1:{proxyd.port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "hit ratio:       75.0% of 4 lookups" in done.stdout
    assert f"{token_registry.host}/{token_image.repository}" in done.stdout


def test_prefetch_beside_a_serving_proxyd_leaves_its_downloads_in_flight_alone(
    tmp_path: Path,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    """The README says to prefetch into the daemon's cache: a prefetch started while
    the daemon downloads must not clear the daemon's temporary files."""
    config = tmp_path / "proxyd.toml"
    config.write_text(upstream_config(token_registry))
    cache = tmp_path / "cache"
    (cache / "tmp").mkdir(parents=True)
    in_flight = cache / "tmp" / "0123456789abcdef-daemons-download"
    in_flight.write_bytes(b"the first bytes of a blob")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "proxyd", "prefetch", "--config", str(config)),
            *("--cache-dir", str(cache), "--log-format", "json", token_image.ref),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert in_flight.read_bytes() == b"the first bytes of a blob"
