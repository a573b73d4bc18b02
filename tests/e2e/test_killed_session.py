"""A pytest that is killed leaves no peer running: SIGTERM ends the session as Ctrl-C
does, so the fixtures' finalizers stop their peers (tests/conftest.py); SIGKILL runs
no finalizer, and the peers go by ``PR_SET_PDEATHSIG`` (tests/peers/children.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import held_peers
from tests.peers import stop_process
from tests.peers.children import popen
from tests.peers.proxyd import PROJECT_ROOT

pytestmark = pytest.mark.peers

START_WITHIN = 60.0  # the inner pytest's imports and its peers, on a loaded machine
GONE_WITHIN = 20.0  # proxyd's own shutdown on SIGTERM is bounded well below this


def running(pid: int) -> bool:
    """The process exists and is not a zombie (one nobody has reaped yet is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def held_session(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[int], Path]:
    """A pytest running tests/e2e/held_peers.py, once its peers run; their PIDs."""
    pids, finalized = tmp_path / "pids.json", tmp_path / "finalized"
    env = {held_peers.PIDS_ENV: str(pids), held_peers.FINALIZED_ENV: str(finalized)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    argv += ["--basetemp", str(tmp_path / "inner"), held_peers.__file__]
    log = tmp_path / "inner.log"
    with log.open("wb") as out:
        proc = popen(
            argv,
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_WITHIN
    while not pids.exists() or not pids.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"the inner pytest did not start its peers:\n{log.read_text()}")
        time.sleep(0.05)
    return proc, json.loads(pids.read_text()), finalized


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_the_peers_of_a_killed_pytest_go_with_it(tmp_path: Path, signum: signal.Signals) -> None:
    proc, pids, finalized = held_session(tmp_path)
    try:
        assert all(running(pid) for pid in pids)
        proc.send_signal(signum)
        proc.wait(timeout=GONE_WITHIN)
        deadline = time.monotonic() + GONE_WITHIN
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in pids if running(pid)]
        log = (tmp_path / "inner.log").read_text(errors="replace")
        assert left == [], f"still running after {GONE_WITHIN} s: {left}\n{log}"
        if signum == signal.SIGTERM:
            # An interrupted session (exit 2) whose finalizers ran, not a killed one.
            assert proc.returncode == pytest.ExitCode.INTERRUPTED, log
            assert finalized.exists(), log
        else:
            assert proc.returncode == -signal.SIGKILL
            assert not finalized.exists()  # so the kernel, not a finalizer, stopped them
    finally:
        stop_process(proc)
        for pid in pids:  # a failed case leaves no peer behind either
            if running(pid):
                os.kill(pid, signal.SIGKILL)
