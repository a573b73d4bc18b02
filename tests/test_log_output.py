"""proxyd's log output (proxyd/log.py): JSON lines; while serving, access lines go
out in batches, other events at once, and nothing is lost on the way out."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from proxyd.log import OUTPUT, configure


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


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
