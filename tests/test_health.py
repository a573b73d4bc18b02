"""Health endpoints: liveness while the process serves, readiness while the cache
directory takes new files."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import MakeProxyd, until_logged


async def test_healthz_answers_ok(make_proxyd: MakeProxyd) -> None:
    proxyd = await make_proxyd("")
    response = await proxyd.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
    assert (await proxyd.head("/healthz")).status == 200


async def test_readyz_answers_ok_and_leaves_nothing_in_the_cache(
    make_proxyd: MakeProxyd, cache_dir: Path
) -> None:
    proxyd = await make_proxyd("")
    for _ in range(3):
        response = await proxyd.get("/readyz")
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    assert list((cache_dir / "tmp").iterdir()) == []


async def test_readyz_is_503_with_the_reason_while_the_cache_cannot_be_written(
    make_proxyd: MakeProxyd, cache_dir: Path
) -> None:
    proxyd = await make_proxyd("")
    shutil.rmtree(cache_dir / "tmp")
    (cache_dir / "tmp").write_text("not a directory")

    response = await proxyd.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unavailable"
    assert str(cache_dir / "tmp") in body["reason"]
    assert "not writable" in body["reason"]
    # Alive all the same: restarting would not help, fixing the disk would.
    assert (await proxyd.get("/healthz")).status == 200

    (cache_dir / "tmp").unlink()
    (cache_dir / "tmp").mkdir()
    assert (await proxyd.get("/readyz")).status == 200


async def test_health_endpoints_answer_get_and_head_only(make_proxyd: MakeProxyd) -> None:
    proxyd = await make_proxyd("")
    assert (await proxyd.post("/healthz")).status == 405
    assert (await proxyd.delete("/readyz")).status == 405


async def test_successful_probes_and_scrapes_write_no_access_log(make_proxyd):
    from structlog.testing import capture_logs

    proxyd = await make_proxyd("")
    with capture_logs() as logs:
        for path in ("/healthz", "/readyz", "/metrics", "/v2/"):
            assert (await proxyd.get(path)).status == 200
        await until_logged(proxyd)
    assert [e["path"] for e in logs if e["event"] == "request"] == ["/v2/"]
