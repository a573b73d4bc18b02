"""A host that keeps failing is skipped for a while, then probed by one request."""

from __future__ import annotations

import pytest

from proxyd.breaker import MAX_REMEMBERED, MAX_RETRY_AFTER, Breakers, Pauses, parse_retry_after
from tests.conftest import host, origin
from tests.fakes import FakeRegistry, make_image


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_host_is_skipped_after_consecutive_failures_then_probed_once():
    clock = Clock()
    breakers = Breakers(failures=3, cooldown=30, clock=clock)
    for _ in range(2):
        breakers.failed("mirror")
        assert breakers.allow("mirror")
    breakers.failed("mirror")
    assert not breakers.allow("mirror")
    clock.now += 31
    assert breakers.allow("mirror")  # the probe
    assert not breakers.allow("mirror")  # everyone else waits for it
    breakers.succeeded("mirror")
    assert breakers.allow("mirror") and breakers.allow("mirror")


def test_a_failed_probe_opens_the_circuit_again():
    clock = Clock()
    breakers = Breakers(failures=1, cooldown=30, clock=clock)
    breakers.failed("mirror")
    clock.now += 31
    assert breakers.allow("mirror")
    breakers.failed("mirror")
    assert not breakers.allow("mirror")


def test_a_success_forgets_earlier_failures():
    breakers = Breakers(failures=2, cooldown=30, clock=Clock())
    breakers.failed("mirror")
    breakers.succeeded("mirror")
    breakers.failed("mirror")
    assert breakers.allow("mirror")


def test_a_pause_leaves_one_kind_of_request_to_a_host_alone_for_as_long_as_asked():
    """A 429's Retry-After no longer closes the whole host: it pauses what was limited."""
    clock = Clock()
    pauses = Pauses(clock=clock)
    pauses.pause(("hub", "GET manifests"), 120)
    clock.now += 100
    assert pauses.remaining(("hub", "GET manifests")) == 20
    assert pauses.remaining(("hub", "GET blobs")) is None
    clock.now += 21
    assert pauses.remaining(("hub", "GET manifests")) is None


def test_a_pause_is_at_most_an_hour_and_the_oldest_is_forgotten_first():
    clock = Clock()
    pauses = Pauses(clock=clock, max_entries=2)
    pauses.pause(("a", "GET manifests"), 10**9)
    assert pauses.remaining(("a", "GET manifests")) == MAX_RETRY_AFTER
    pauses.pause(("b", "GET manifests"), 10)
    pauses.pause(("c", "GET manifests"), 10)
    assert pauses.remaining(("a", "GET manifests")) is None
    assert pauses.remaining(("c", "GET manifests")) == 10


def test_the_breakers_remember_a_bounded_number_of_hosts():
    breakers = Breakers(failures=1, cooldown=30, clock=Clock())
    for index in range(MAX_REMEMBERED + 1):
        breakers.failed(f"host-{index}.invalid")
    assert breakers.allow("host-0.invalid")  # forgotten: the oldest went first
    assert not breakers.allow(f"host-{MAX_REMEMBERED}.invalid")


def test_retry_after_is_seconds_or_an_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412480.0) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("9" * 5000, MAX_RETRY_AFTER),  # past Python's 4,300-digit int(): no matter
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
        ("\u00b2", None),  # a superscript two: str.isdigit says yes, float() says no
        ("\u0663", None),  # an Arabic-Indic three: not an HTTP digit
        ("Mon, 01 Jan 99999 00:00:00 GMT", None),
        ("Thu, 01 Jan 1970 00:00:00 +9999", None),
    ],
)
def test_any_retry_after_is_bounded_seconds_or_none(value, seconds):
    assert parse_retry_after(value, now=lambda: 0.0) == seconds


def chain(upstream_server: object, mirror_server: object, *extra: str) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(upstream_server)}"',
            *extra,
            f'[namespaces."{host(upstream_server)}"]',
            f'server = "{origin(upstream_server)}"',
            "tag_ttl = 0",
            f'[namespaces."{host(upstream_server)}".host."{origin(mirror_server)}"]',
            'capabilities = ["pull", "resolve"]',
            "read_timeout = 0.3",
        ]
    )


async def test_a_hanging_mirror_stops_costing_its_timeout(make_proxyd, start_fake):
    upstream, mirror = FakeRegistry(), FakeRegistry(hang=True)
    upstream.add(make_image())
    proxyd = await make_proxyd(
        chain(await start_fake(upstream), await start_fake(mirror), "breaker_failures = 2")
    )
    for _ in range(4):
        assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert len(mirror.seen) == 2


async def test_a_rate_limited_mirror_is_left_alone_for_its_retry_after(make_proxyd, start_fake):
    """Per kind of request: the GET's 429 pauses GETs, the revalidating HEAD's its own
    (Docker Hub limits manifest GETs only, so a HEAD may still answer there)."""
    upstream, mirror = FakeRegistry(), FakeRegistry(status=429, retry_after="600")
    upstream.add(make_image())
    proxyd = await make_proxyd(chain(await start_fake(upstream), await start_fake(mirror)))
    for _ in range(4):
        assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert [s.method for s in mirror.seen] == ["GET", "HEAD"]


async def test_when_every_host_is_skipped_the_answer_is_immediate_and_names_them(
    make_proxyd, start_fake
):
    upstream = FakeRegistry(status=503)
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        "\n".join(
            [
                f'default_namespace = "{host(server)}"',
                "breaker_failures = 1",
                f'[namespaces."{host(server)}"]',
                f'server = "{origin(server)}"',
            ]
        )
    )
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 502
    assert len(upstream.seen) == 2  # a 503 of the last host is asked once more
    skipped = await proxyd.get("/v2/team/app/manifests/v1")
    assert skipped.status == 502
    assert "circuit open" in (await skipped.json())["errors"][0]["message"]
    assert len(upstream.seen) == 2
