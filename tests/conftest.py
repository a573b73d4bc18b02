"""Fixtures shared by the in-process tests: fake upstreams on real TCP ports, a proxyd
app configured by a TOML text, exactly as a user would write it, a clock that moves
only when a test says so, and bounded waits for what happens a moment after a
response (a stored blob, an access line)."""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.config import load_settings
from proxyd.runtime import build_runtime
from proxyd.server import AccessLogger, create_app
from proxyd.server.fastpath import ProxydRunner
from tests.fakes import FakeRegistry, FakeTokenServer

MakeProxyd = Callable[..., Awaitable[TestClient[Any, Any]]]
# Lines a test leaves for the end of the output (the conformance suite's summary).
SUMMARY_LINES = pytest.StashKey[list[str]]()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the session as Ctrl-C does, so fixtures' finalizers stop the peers
    they started; a second SIGTERM kills at once (the peers then go by their
    ``PR_SET_PDEATHSIG``: tests/peers/children.py)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SUMMARY_LINES] = []
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for line in config.stash.get(SUMMARY_LINES, []):
        terminalreporter.write_line(line)


class FakeClock:
    """A proxyd.clock.Clock that stands still until `advance` (or proxyd's `sleep`) moves
    both readings. It starts at the real readings (to the whole second, so that
    whole-second advances add up exactly: 3599 s then 1 s is an hour to the last bit),
    so the wall clock compares with files' mtimes as the system's would."""

    def __init__(self) -> None:
        self._monotonic = float(int(time.monotonic()))
        self._time = float(int(time.time()))
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._time

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a clock does not go back"
        self._monotonic += seconds
        self._time += seconds

    async def sleep(self, seconds: float) -> None:
        """A wait proxyd makes on purpose (a retry): the clock moves on at once, and
        the wait is kept in `slept` for the test to read."""
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool | Awaitable[bool]], within: float = 10.0) -> None:
    """Return once `condition` holds, checked at every turn of the event loop; fail
    after `within` seconds (a bound for a loaded machine, not a delay)."""
    try:
        async with asyncio.timeout(within):
            while True:
                held = condition()
                if inspect.isawaitable(held):
                    held = await held
                if held:
                    return
                await asyncio.sleep(0)
    except TimeoutError:
        raise AssertionError(f"{condition.__qualname__} did not hold within {within} s") from None


class ProxydTestServer(TestServer):
    """A test server with the runner `proxyd serve` uses (remembered answers included)."""

    async def _make_runner(self, **kwargs: Any) -> ProxydRunner:
        return ProxydRunner(self.app, **kwargs)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_proxyd(aiohttp_client: Any, tmp_path: Path, cache_dir: Path) -> MakeProxyd:
    """`make_proxyd(config, clock=FakeClock())`: a proxyd whose core reads that clock;
    `daemon=True`: the app as `proxyd serve` builds it, which asks its hosts at start."""

    async def make(
        config: str, *, clock: Clock = SYSTEM_CLOCK, daemon: bool = False, **flags: Any
    ) -> TestClient[Any, Any]:
        path = tmp_path / "proxyd.toml"
        path.write_text(config)
        flags.setdefault("cache_dir", cache_dir)
        settings = load_settings(path, **flags)
        app = create_app(build_runtime(settings), clock=clock, preconnect=daemon)
        server = ProxydTestServer(app, host="127.0.0.1")
        await server.start_server(access_log_class=AccessLogger)  # as `proxyd serve` does
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return make


@pytest.fixture
def start_fake(aiohttp_server: Any) -> Callable[[Any], Awaitable[TestServer]]:
    async def start(fake: FakeRegistry | FakeTokenServer) -> TestServer:
        server: TestServer = await aiohttp_server(fake.app(), host="127.0.0.1")
        return server

    return start


def origin(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def host(server: TestServer) -> str:
    return f"127.0.0.1:{server.port}"


async def oci_code(response: Any) -> str:
    """The code of the first error in an OCI error answer, which must be JSON."""
    assert response.headers["Content-Type"].startswith("application/json")
    code: str = (await response.json())["errors"][0]["code"]
    return code


async def until_stored(cache_dir: Path, digest: str, within: float = 10.0) -> Path:
    """The blob's path once it is in the store. A download releases its last byte as
    soon as the digest is verified and renames the file into place after its fsync,
    so a client can have the whole blob a moment before the store does."""
    algorithm, hex_ = digest.split(":")
    path = cache_dir / "blobs" / algorithm / hex_
    await until(path.exists, within)
    return path


async def until_logged(proxyd: TestClient[Any, Any]) -> None:
    """Once every request the proxyd took has finished: aiohttp writes the access line,
    and with it counts the request metrics, after the response's last byte, so a client
    can hold its answer a turn of the loop before. (Remembered answers are logged and
    counted as they are written.)"""
    server = proxyd.server.runner.server if proxyd.server.runner else None
    assert server is not None, "a started proxyd"
    # The aiohttp connection state that proxyd.server.fastpath relies on, too.
    await until(lambda: not any(h._request_in_progress for h in server.connections))
