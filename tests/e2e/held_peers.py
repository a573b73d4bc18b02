"""A test that holds real peers until its pytest is killed, for
tests/e2e/test_killed_session.py, which runs it in a pytest of its own. The suite never
collects it (no ``test_`` prefix); named on a command line, pytest runs it, with
tests/conftest.py as in the suite."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import listening_pid, spawn
from tests.peers import stop_process
from tests.peers.proxyd import ProxydProcess, proxyd_config
from tests.peers.redisserver import RedisServer

PIDS_ENV = "PROXYD_HELD_PEERS_PIDS"  # where the test writes its peers' PIDs
FINALIZED_ENV = "PROXYD_HELD_PEERS_FINALIZED"  # what the fixture's finalizer writes


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[int]]:
    """A redis-server and a proxyd from tests/peers, a process from bench/procs.py."""
    redis = RedisServer(tmp_path / "redis").start()
    node = ProxydProcess(proxyd_config(default_namespace=None), tmp_path / "proxyd").start()
    sleeper = spawn(["sleep", "600"], log=tmp_path / "sleep.log")
    try:
        yield [listening_pid(redis.port), listening_pid(node.port), sleeper.pid]
    finally:
        stop_process(sleeper)
        node.stop()
        redis.stop()
        Path(os.environ[FINALIZED_ENV]).write_text("finalized\n")


def test_holds_its_peers_until_killed(peers: list[int]) -> None:
    Path(os.environ[PIDS_ENV]).write_text(json.dumps(peers))
    time.sleep(60)  # the test that started this pytest kills it long before
