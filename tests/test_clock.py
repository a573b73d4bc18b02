"""One clock for the whole app: a FakeClock given to make_proxyd is the clock of every
component that reads the time, so moving it ends token lifetimes, circuit
cool-downs and inbound users' remembered checks without a wait."""

from __future__ import annotations

import bcrypt

from proxyd import inbound
from proxyd.clock import SYSTEM_CLOCK
from tests.conftest import FakeClock, MakeProxyd, host, origin
from tests.fakes import FakeRegistry, FakeTokenServer, make_image
from tests.test_inbound import basic, write_htpasswd


def config(server: object, *extra: str) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            *extra,
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
        ]
    )


def test_the_system_clock_reads_the_time_module():
    import time

    assert SYSTEM_CLOCK.monotonic is time.monotonic  # nothing between a reading and it
    assert abs(SYSTEM_CLOCK.time() - time.time()) < 60


def test_a_fake_clock_moves_both_readings_only_when_advanced():
    clock = FakeClock()
    monotonic, wall = clock.monotonic(), clock.time()
    assert (clock.monotonic(), clock.time()) == (monotonic, wall)
    clock.advance(90)
    assert (clock.monotonic(), clock.time()) == (monotonic + 90, wall + 90)


async def test_a_token_is_fetched_again_once_the_apps_clock_passes_its_lifetime(
    make_proxyd: MakeProxyd, start_fake
):
    upstream = FakeRegistry()
    tokens = FakeTokenServer(upstream)
    upstream.bearer_realm = f"{origin(await start_fake(tokens))}/token"
    for tag in ("v1", "v2", "v3"):
        upstream.add(make_image(tag=tag))
    clock = FakeClock()
    proxyd = await make_proxyd(config(await start_fake(upstream)), clock=clock)
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert (await proxyd.get("/v2/team/app/manifests/v2")).status == 200
    assert tokens.issued == 1  # the same scope, within the token's 300 s
    clock.advance(301)
    assert (await proxyd.get("/v2/team/app/manifests/v3")).status == 200
    assert tokens.issued == 2


async def test_a_mirror_is_asked_again_once_the_apps_clock_passes_its_retry_after(
    make_proxyd: MakeProxyd, start_fake
):
    upstream, mirror = FakeRegistry(), FakeRegistry(status=429, retry_after="600")
    for tag in ("v1", "v2", "v3"):
        upstream.add(make_image(tag=tag))
    server, mirror_server = await start_fake(upstream), await start_fake(mirror)
    clock = FakeClock()
    proxyd = await make_proxyd(
        "\n".join(
            [
                config(server),
                f'[namespaces."{host(server)}".host."{origin(mirror_server)}"]',
                'capabilities = ["pull", "resolve"]',
            ]
        ),
        clock=clock,
    )
    for tag in ("v1", "v2"):
        assert (await proxyd.get(f"/v2/team/app/manifests/{tag}")).status == 200
    assert len(mirror.seen) == 1
    clock.advance(600)
    assert (await proxyd.get("/v2/team/app/manifests/v3")).status == 200
    assert len(mirror.seen) == 2


async def test_an_inbound_users_remembered_check_ends_with_the_apps_clock(
    make_proxyd: MakeProxyd, tmp_path, monkeypatch
):
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    clock = FakeClock()
    proxyd = await make_proxyd(f'htpasswd = "{htpasswd}"\nauth_required = "all"', clock=clock)
    alice = basic("alice", "wonderland")
    for _ in range(2):
        assert (await proxyd.get("/v2/", headers=alice)).status == 200
    assert len(checks) == 1
    clock.advance(inbound.CACHE_SECONDS + 1)
    assert (await proxyd.get("/v2/", headers=alice)).status == 200
    assert len(checks) == 2
