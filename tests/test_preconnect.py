"""What a started proxyd sends upstream on its own (proxyd/preconnect.py): one
`GET /v2/` per configured host, in the background, so that the first pull after a
start finds the connection open and the challenge known; never waited for, never
counted against a host, nothing at all when turned off or offline."""

from __future__ import annotations

from structlog.testing import capture_logs

from proxyd.config import load_settings
from proxyd.preconnect import hosts_to_ask, namespaces_to_warm
from proxyd.runtime import build_runtime
from tests.conftest import host, origin, until
from tests.fakes import FakeRegistry, make_image
from tests.peers.proxyd import CLOSED_PORT_URL
from tests.test_pull import alice, behind_token_server, upstream_config

MANIFEST = "/v2/team/app/manifests/v1"


async def test_a_started_proxyd_asks_each_configured_host_once_without_credentials(
    make_proxyd, start_fake
):
    mirror, upstream = FakeRegistry(), FakeRegistry()
    mirror_server, upstream_server = await start_fake(mirror), await start_fake(upstream)
    config = upstream_config(
        upstream_server,
        f'[namespaces."{host(upstream_server)}".host."{origin(mirror_server)}"]',
        'capabilities = ["pull"]',
        '[namespaces."other.example"]',  # the same server again: asked once
        f'server = "{origin(upstream_server)}"',
        *alice(upstream_server),
    )
    with capture_logs() as events:
        await make_proxyd(config, daemon=True)
        await until(lambda: len([e for e in events if e["event"] == "preconnect"]) == 2)
    for fake in (mirror, upstream):
        assert [(s.method, s.path) for s in fake.seen] == [("GET", "/v2/")]
        assert "Authorization" not in fake.seen[0].headers
    asked = sorted((e["host"], e["status"]) for e in events if e["event"] == "preconnect")
    assert asked == sorted([(origin(mirror_server), 200), (origin(upstream_server), 200)])


async def test_the_first_pull_after_a_start_asks_its_token_first_and_the_registry_once(
    make_proxyd, start_fake
):
    upstream, tokens, server, _image = await behind_token_server(start_fake)
    with capture_logs() as events:
        proxyd = await make_proxyd(upstream_config(server, *alice(server)), daemon=True)
        await until(lambda: any(e["event"] == "preconnect" for e in events))
    (event,) = [e for e in events if e["event"] == "preconnect"]
    assert (event["status"], event["challenge"]) == (401, "bearer")

    assert (await proxyd.get(MANIFEST)).status == 200

    # Without preconnect the manifest went out bare first, to learn the challenge.
    assert [(s.path, "Authorization" in s.headers) for s in upstream.seen] == [
        ("/v2/", False),
        ("/v2/team/app/manifests/v1", True),
    ]
    assert tokens.issued == 1


async def test_without_preconnect_the_first_pull_learns_the_challenge_from_its_own_401(
    make_proxyd, start_fake
):
    upstream, tokens, server, _image = await behind_token_server(start_fake)
    proxyd = await make_proxyd(upstream_config(server, *alice(server)))
    assert (await proxyd.get(MANIFEST)).status == 200
    assert [(s.path, "Authorization" in s.headers) for s in upstream.seen] == [
        ("/v2/team/app/manifests/v1", False),
        ("/v2/team/app/manifests/v1", True),
    ]
    assert tokens.issued == 1


async def test_turned_off_or_offline_a_started_proxyd_sends_nothing_upstream(
    make_proxyd, start_fake
):
    upstream = FakeRegistry()
    upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd("preconnect = false\n" + upstream_config(server), daemon=True)
    assert (await proxyd.get(MANIFEST)).status == 200
    assert [s.path for s in upstream.seen] == [MANIFEST]  # the pull's own request alone

    offline = await make_proxyd("offline = true\n" + upstream_config(server), daemon=True)
    assert (await offline.get("/readyz")).status == 200
    assert (await offline.get(MANIFEST)).status == 200  # stored by the first proxyd
    assert [s.path for s in upstream.seen] == [MANIFEST]


async def test_a_host_that_hangs_or_refuses_at_start_holds_up_neither_readiness_nor_pulls(
    start_fake,
    make_proxyd,  # in this order: proxyd stops first, cutting its hung request
):
    hanging, working = FakeRegistry(hang=True), FakeRegistry()
    working.add(make_image())
    hanging_server, working_server = await start_fake(hanging), await start_fake(working)
    config = upstream_config(
        working_server,
        f'[namespaces."{host(hanging_server)}"]',
        f'server = "{origin(hanging_server)}"',
        '[namespaces."closed.example"]',
        f'server = "{CLOSED_PORT_URL}"',
    )
    with capture_logs() as events:
        proxyd = await make_proxyd(config, daemon=True)
        await until(lambda: any(e["event"] == "preconnect.failed" for e in events))
        await until(lambda: bool(hanging.seen))  # asked, and never answering
        assert (await proxyd.get("/readyz")).status == 200
        assert (await proxyd.get(MANIFEST)).status == 200
    (failed,) = [e for e in events if e["event"] == "preconnect.failed"]
    assert (failed["host"], failed["log_level"]) == (CLOSED_PORT_URL, "warning")
    assert "refused" in failed["error"]


async def test_a_failure_at_start_counts_nothing_against_the_host(make_proxyd, start_fake):
    """The breaker opens after `breaker_failures` real failures; a refused preconnect
    is not one: the first pull still asks the host (and gets its own 502)."""
    config = "\n".join(
        [
            'default_namespace = "closed.example"',
            "breaker_failures = 1",
            '[namespaces."closed.example"]',
            f'server = "{CLOSED_PORT_URL}"',
        ]
    )
    with capture_logs() as events:
        proxyd = await make_proxyd(config, daemon=True)
        await until(lambda: any(e["event"] == "preconnect.failed" for e in events))
    response = await proxyd.get(MANIFEST)
    assert response.status == 502
    assert "refused" in (await response.text())  # asked, not skipped by an open breaker


def hosts_asked(tmp_path, config: str) -> list[str]:
    path = tmp_path / "proxyd.toml"
    path.write_text(config)
    runtime = build_runtime(load_settings(path))
    return [h.origin for h in hosts_to_ask(namespaces_to_warm(runtime))]


def test_docker_hub_is_asked_at_start_where_it_is_configured_or_the_default(tmp_path):
    private = '[namespaces."registry.corp"]\nserver = "https://registry.corp"\n'
    assert hosts_asked(tmp_path, 'default_namespace = "registry.corp"\n' + private) == [
        "https://registry.corp"
    ]
    assert hosts_asked(tmp_path, private) == [  # docker.io, the default namespace
        "https://registry.corp",
        "https://registry-1.docker.io",
    ]
    mirrored = '[namespaces."docker.io".host."https://mirror.corp"]\ncapabilities = ["pull"]\n'
    assert hosts_asked(tmp_path, 'default_namespace = "registry.corp"\n' + private + mirrored) == [
        "https://registry.corp",
        "https://mirror.corp",
        "https://registry-1.docker.io",
    ]
    push_only = '[namespaces."docker.io".host."https://push.corp"]\ncapabilities = ["push"]\n'
    assert "https://push.corp" not in hosts_asked(tmp_path, push_only)
