"""proxyd's log output (proxyd/log.py): JSON lines; while serving, access lines go
out in batches, other events at once, and nothing is lost on the way out."""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import select
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import structlog
from structlog.testing import capture_logs

from proxyd import log as log_module
from proxyd.log import (
    ACCESS_LOGGER,
    HOLE,
    MAX_BATCH,
    OUTPUT,
    AccessTemplate,
    Output,
    configure,
    utc_timestamp,
)
from proxyd.server import middleware
from proxyd.server.keys import Access
from proxyd.server.middleware import AccessLine, log_request
from tests.conftest import until


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
        written: list[str] = []

        def batch_flushed() -> bool:  # by the batch's timer: nothing else is logged
            written.append(capfd.readouterr().err)
            return any(written)

        await until(batch_flushed)
        flushed = "".join(written).splitlines()
        log.info("last")
    left = capfd.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in urgent] == ["request", "upstream.failed"]
    assert [json.loads(line)["path"] for line in flushed] == ["/v2/x"]
    (last,) = [json.loads(line) for line in left]
    assert last["event"] == "last" and last["logger"] == "proxyd.access"
    assert last["level"] == "info" and last["timestamp"].endswith("Z")


async def test_a_full_batch_is_written_without_waiting_for_its_timer(capfd):
    output = Output()
    async with output.batched(interval=60):
        for n in range(MAX_BATCH - 1):
            output.write(f"{n}\n", urgent=False)
        assert capfd.readouterr().err == ""
        output.write("last\n", urgent=False)
        assert capfd.readouterr().err.splitlines() == [*map(str, range(MAX_BATCH - 1)), "last"]


async def test_a_log_whose_reader_is_gone_is_dropped_and_fails_nothing():
    reader, writer = os.pipe()
    os.close(reader)  # writing now fails with EPIPE
    output = Output(fd=writer)
    try:
        async with output.batched(interval=60):
            output.write("lost\n", urgent=False)
            output.write("lost too\n")
        output.flush()
    finally:
        os.close(writer)


@pytest.fixture
def small_pipe() -> Iterator[tuple[int, int]]:
    """A pipe of one page (4 KiB), its write end non-blocking, as a parent may leave
    stderr (`F_SETPIPE_SZ`: fcntl(2))."""
    reader, writer = os.pipe()
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(writer, False)
    yield reader, writer
    os.close(reader)
    os.close(writer)


async def test_a_non_blocking_stderr_is_waited_for_while_its_reader_reads(small_pipe):
    reader, writer = small_pipe
    line = "x" * 10_000 + "\n"  # more than the pipe holds: EAGAIN until it is read
    got = bytearray()

    def read() -> None:  # until the line is in, for 10 s at most
        deadline = time.monotonic() + 10
        while len(got) < len(line) and time.monotonic() < deadline:
            if select.select([reader], [], [], 0.1)[0]:
                got.extend(os.read(reader, 65536))

    drain = threading.Thread(target=read, daemon=True)
    output = Output(fd=writer)
    async with output.batched(interval=60):
        drain.start()
        output.write(line)
    drain.join(timeout=10)
    assert got.decode() == line


async def test_a_line_cut_by_a_reader_that_stopped_is_ended_before_the_next_batch(small_pipe):
    reader, writer = small_pipe
    output = Output(fd=writer)
    output.write_wait = 0.01  # nobody reads: the wait is in vain
    async with output.batched(interval=60):
        output.write("y" * 10_000 + "\n")  # 4 KiB of it fit
        cut = os.read(reader, 65536)
        output.write("stalled\n")  # the pipe has room: written without a wait
        output.write("next\n")
    lines = (cut + os.read(reader, 65536)).decode().split("\n")
    assert lines == ["y" * len(cut), "stalled", "next", ""]


async def test_after_a_wait_in_vain_nothing_waits_until_a_batch_goes_out_whole(
    small_pipe, monkeypatch
):
    reader, writer = small_pipe
    waits: list[float] = []

    def in_vain(_fd: int, timeout: float) -> bool:
        waits.append(timeout)
        return False

    monkeypatch.setattr(log_module, "_writable", in_vain)
    output = Output(fd=writer)
    async with output.batched(interval=60):
        output.write("z" * 8192 + "\n")  # waits once, in vain
        output.write("dropped at once\n")  # the pipe still full: no wait
        assert len(waits) == 1
        os.read(reader, 65536)
        output.write("whole\n")
        output.write("w" * 8192 + "\n")  # a batch went out whole: waited for again
    assert len(waits) == 2


def test_outside_a_server_every_line_is_written_at_once(capfd):
    configure("info", "json")
    structlog.get_logger("proxyd.test").info("hello", n=1)
    (line,) = capfd.readouterr().err.splitlines()
    assert json.loads(line) == {**json.loads(line), "event": "hello", "n": 1}


@pytest.mark.parametrize("aborted", [False, True])
@pytest.mark.parametrize("request_id", ["r1", 'a "quoted" \\ %s id'])
@pytest.mark.parametrize("seconds", [0.00031, 0.0, 0.00005, 0.00149, 1.23456, 86_400.0])
def test_a_prepared_access_line_is_the_pipelines_line(capfd, aborted, request_id, seconds):
    configure("info", "json")
    access = Access(namespace="docker.io", repository="library/app", cache="hit")
    access.aborted = aborted
    structlog.contextvars.bind_contextvars(request_id=request_id)
    path = "/v2/library/app/manifests/100%s%%"
    log_request("GET", path, access, 200, 527, seconds)
    structlog.contextvars.clear_contextvars()
    AccessLine("GET", path, access, 200, 527).write(seconds, request_id)
    through_structlog, prepared = capfd.readouterr().err.splitlines()
    assert list(json.loads(prepared)) == list(json.loads(through_structlog))
    assert json.loads(prepared)["duration_ms"] == pytest.approx(seconds * 1000, abs=0.05)
    assert json.loads(prepared) == {
        **json.loads(through_structlog),
        "timestamp": json.loads(prepared)["timestamp"],
    }


def test_a_prepared_access_line_goes_through_structlog_where_the_output_is_not_json(capfd):
    configure("info", "console")
    access = Access(namespace="docker.io", repository="library/app", cache="hit")
    AccessLine("HEAD", "/v2/library/app/manifests/x", access, 200, 0).write(0.002, "r2")
    line = capfd.readouterr().err
    assert "request" in line and "request_id=r2" in line and "duration_ms=2.0" in line


def test_a_prepared_access_line_is_not_written_above_info(capfd):
    configure("warning", "json")
    access = Access(namespace="docker.io", repository="library/app", cache="hit")
    AccessLine("GET", "/v2/library/app/manifests/x", access, 200, 1).write(0.002, "r2")
    assert capfd.readouterr().err == ""


def test_a_field_that_is_a_hole_itself_is_logged_through_structlog(capfd):
    configure("info", "json")
    access = Access(namespace="docker.io", repository=HOLE, cache="hit")
    with capture_logs() as logs:
        AccessLine("GET", "/v2/x/manifests/y", access, 200, 1).write(0.001, "r3")
    assert [event["repository"] for event in logs] == [HOLE]
    assert capfd.readouterr().err == ""


def test_a_template_whose_fixed_fields_render_like_a_hole_never_writes(capfd):
    configure("info", "json")
    assert not AccessTemplate({"odd": [HOLE], "duration_ms": HOLE}).write(1.0)
    assert AccessTemplate({"fine": "x", "duration_ms": HOLE}).write(1.0)
    (line,) = capfd.readouterr().err.splitlines()
    assert json.loads(line)["duration_ms"] == 1.0


@pytest.mark.parametrize("micros", [1795774030_233058, 1795774030_000000, 1795774030_000001])
def test_timestamps_are_written_as_structlog_writes_them(monkeypatch, micros):
    second, micro = divmod(micros, 1_000_000)
    instant = datetime.datetime.fromtimestamp(second, datetime.UTC).replace(microsecond=micro)

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            return instant

    frozen = SimpleNamespace(datetime=Frozen, timezone=datetime.timezone)
    monkeypatch.setattr(structlog.processors, "datetime", frozen)
    monkeypatch.setattr(time, "time_ns", lambda: micros * 1000)
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    assert utc_timestamp() == stamper(None, "info", {})["timestamp"]
