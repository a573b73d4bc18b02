"""/metrics tells an operator what proxyd did: requests, cache results, bytes, joins,
upstream latency and failures, tokens, rate limits and circuit breakers."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxyd.metrics import Metrics, Observations
from tests.conftest import host, origin, until_logged, until_stored
from tests.fakes import FakeRegistry, FakeTokenServer, make_image


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def config(server: object, *extra: str) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
            *extra,
        ]
    )


async def scrape(proxyd) -> str:
    await until_logged(proxyd)  # request metrics are counted once the response is sent
    response = await proxyd.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


async def test_pulls_are_counted_by_route_status_and_cache_result(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry()
    tokens = FakeTokenServer(upstream)
    upstream.bearer_realm = f"{origin(await start_fake(tokens))}/token"
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server))
    await proxyd.get("/v2/team/app/manifests/v1")
    for _ in range(2):
        await (await proxyd.get(f"/v2/team/app/blobs/{image.layer}")).read()
        await until_stored(cache_dir, image.layer)
    await proxyd.get("/v2/team/app/manifests/nope")
    text = await scrape(proxyd)
    size = len(image.blobs[image.layer])

    assert value(text, "proxyd_requests_total", route="blobs", method="GET", status="200") == 2
    assert value(text, "proxyd_requests_total", route="manifests", method="GET", status="404") == 1
    assert value(text, "proxyd_cache_lookups_total", kind="blob", result="miss") == 1
    assert value(text, "proxyd_cache_lookups_total", kind="blob", result="hit") == 1
    assert value(text, "proxyd_cache_lookups_total", kind="tag", result="miss") == 1
    assert value(text, "proxyd_served_bytes_total", source="store") == size
    assert value(text, "proxyd_served_bytes_total", source="upstream") >= size
    assert value(text, "proxyd_upstream_fetched_bytes_total", host=host(server)) == size
    assert value(text, "proxyd_token_fetches_total", host=host(server)) == 1
    assert (
        value(
            text, "proxyd_upstream_request_duration_seconds_count", host=host(server), status="2xx"
        )
        >= 2
    )


async def test_joined_downloads_are_counted_as_coalesced(make_proxyd, start_fake):
    upstream = FakeRegistry(gate=asyncio.Event())
    image = upstream.add(make_image(layer=b"z" * 500_000))
    proxyd = await make_proxyd(config(await start_fake(upstream)))

    async def pull() -> bytes:
        response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
        assert upstream.gate is not None
        upstream.gate.set()
        return await response.read()

    await asyncio.gather(*(pull() for _ in range(5)))
    text = await scrape(proxyd)
    assert value(text, "proxyd_coalesced_requests_total") == 4


async def test_failures_and_open_circuits_are_visible(make_proxyd, start_fake):
    upstream = FakeRegistry(status=503)
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        config(server).replace("[namespaces", "breaker_failures = 1\n[namespaces", 1)
    )
    await proxyd.get("/v2/team/app/manifests/v1")
    text = await scrape(proxyd)
    assert value(text, "proxyd_upstream_errors_total", host=host(server), reason="503") == 1
    assert value(text, "proxyd_circuit_open", host=host(server)) == 1


async def test_docker_hub_rate_limit_headers_become_gauges(make_proxyd, aiohttp_server):
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "team/app", "tags": []},
            headers={"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "7;w=21600"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app, host="127.0.0.1")
    proxyd = await make_proxyd(config(server))
    await proxyd.get("/v2/team/app/tags/list")
    text = await scrape(proxyd)
    assert value(text, "proxyd_upstream_ratelimit_limit", host=host(server)) == 100
    assert value(text, "proxyd_upstream_ratelimit_remaining", host=host(server)) == 7


def test_observations_kept_aside_render_as_observed_once_settled():
    direct, aside = Metrics(), Metrics()
    observations = Observations(aside.request_seconds.labels("manifest"))
    aside.before_render(observations.settle)
    amounts = [0.0, 0.0001, 0.005, 0.0051, 0.3, 2.5, 7.0, 99.0]
    for amount in amounts:
        direct.request_seconds.labels("manifest").observe(amount)
        observations.observe(amount)
    assert samples(aside.render().decode()) == samples(direct.render().decode())
    observations.observe(0.2)  # after a scrape, counted from there on
    direct.request_seconds.labels("manifest").observe(0.2)
    assert samples(aside.render().decode()) == samples(direct.render().decode())


def test_observations_go_to_the_histogram_at_once_where_its_buckets_are_not_known():
    class Opaque:
        def __init__(self) -> None:
            self.observed: list[float] = []

        def observe(self, amount: float) -> None:
            self.observed.append(amount)

    histogram = Opaque()
    observations = Observations(histogram)  # type: ignore[arg-type]
    observations.observe(0.1)
    observations.settle()
    assert histogram.observed == [0.1]
