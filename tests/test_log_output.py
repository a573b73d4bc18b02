"""proxyd's log output (proxyd/log.py): JSON lines; while serving, access lines go
out in batches, other events at once, and nothing is lost on the way out."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from proxyd.log import ACCESS_LOGGER, OUTPUT, configure
from proxyd.server import middleware
from proxyd.server.keys import Access
from proxyd.server.middleware import log_request


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # configure() caches loggers on first use: the access logger used here is a
    # fresh one, so later tests' capture_logs still sees the module's own.
    monkeypatch.setattr(middleware, "log", structlog.get_logger(ACCESS_LOGGER))
    root = logging.getLogger()
    handlers, level, json_access = root.handlers[:], root.level, OUTPUT.json_access
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:], root.level, OUTPUT.json_access = handlers, level, json_access


async def test_access_lines_wait_for_their_batch_and_other_events_do_not(capfd):
    configure("info", "json")
    log = structlog.get_logger("proxyd.access")
    async with OUTPUT.batched(interval=0.2):
        log.info("request", path="/v2/")
        assert capfd.readouterr().err == ""  # still in the batch
        structlog.get_logger("proxyd.upstream").info("upstream.failed", host="h")
        urgent = capfd.readouterr().err.splitlines()
        log.info("request", path="/v2/x")
        await asyncio.sleep(0.4)
        flushed = capfd.readouterr().err.splitlines()
        log.info("last")
    left = capfd.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in urgent] == ["request", "upstream.failed"]
    assert [json.loads(line)["path"] for line in flushed] == ["/v2/x"]
    (last,) = [json.loads(line) for line in left]
    assert last["event"] == "last" and last["logger"] == "proxyd.access"
    assert last["level"] == "info" and last["timestamp"].endswith("Z")


def test_outside_a_server_every_line_is_written_at_once(capfd):
    configure("info", "json")
    structlog.get_logger("proxyd.test").info("hello", n=1)
    (line,) = capfd.readouterr().err.splitlines()
    assert json.loads(line) == {**json.loads(line), "event": "hello", "n": 1}


@pytest.mark.parametrize("aborted", [False, True])
def test_an_access_line_written_directly_is_the_pipelines_line(capfd, aborted):
    configure("info", "json")
    access = Access(namespace="docker.io", repository="library/app", cache="hit")
    access.aborted = aborted
    structlog.contextvars.bind_contextvars(request_id="r1")
    log_request("GET", "/v2/library/app/manifests/x", access, 200, 527, 0.00031)
    structlog.contextvars.clear_contextvars()
    log_request("GET", "/v2/library/app/manifests/x", access, 200, 527, 0.00031, "r1")
    through_structlog, direct = capfd.readouterr().err.splitlines()
    assert list(json.loads(direct)) == list(json.loads(through_structlog))
    assert json.loads(direct) == {
        **json.loads(through_structlog),
        "timestamp": json.loads(direct)["timestamp"],
    }


def test_access_lines_are_written_directly_only_as_json_lines_at_info():
    for level, fmt, direct in (
        ("info", "json", True),
        ("debug", "json", True),
        ("warning", "json", False),
        ("info", "console", False),
    ):
        configure(level, fmt)
        assert OUTPUT.json_access is direct, (level, fmt)
