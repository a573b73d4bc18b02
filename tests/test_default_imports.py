"""What a daemon on the default configuration has imported once it serves: none of
the packages only an optional feature uses (docs/performance.md, "Idle memory").
Each of them is megabytes of every process's memory; a change that imports one on
every node again fails here, not in a benchmark weeks later."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# `proxyd serve` as the command line runs it, stopped as it tells systemd READY=1
# (everything a first request finds is set up by then), printing what it imported.
SERVE_THEN_LIST_MODULES = """
import os, signal, sys
from proxyd import systemd
from proxyd.cli import main

def notify(state):
    if state.startswith("READY=1"):
        print(" ".join(sorted(sys.modules)))
        os.kill(os.getpid(), signal.SIGTERM)

systemd.notify = notify
sys.exit(main(["serve", "--listen", "127.0.0.1:0", "--cache-dir", sys.argv[1],
               "--log-format", "json", "--log-level", "warning"]))
"""

# (package, the feature that uses it)
OPTIONAL = [
    ("redis", "[cluster], or a Redis small cache"),
    ("rich", "proxyd prefetch's progress bars"),
    ("pygments", "rich's tracebacks"),
    ("bcrypt", "proxyd's own users, htpasswd"),
    ("aiohttp_client_cache", "nothing any more: proxyd.smallstorage"),
    ("unittest", "tests"),
    ("frozenlist._frozenlist", "nothing: its pure-Python twin serves (libstdc++)"),
]


@pytest.fixture(scope="module")
def served_modules(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYD_")}
    env |= {"HOME": str(home), "XDG_CACHE_HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", SERVE_THEN_LIST_MODULES, str(home / "cache")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    modules = set(done.stdout.split())
    assert "proxyd.server.app" in modules  # it did serve
    return modules


@pytest.mark.parametrize(("package", "used_by"), OPTIONAL)
def test_the_default_daemon_does_not_import(
    served_modules: set[str], package: str, used_by: str
) -> None:
    loaded = sorted(m for m in served_modules if m == package or m.startswith(package + "."))
    assert not loaded, f"{package} (only {used_by} uses it) is imported: {loaded[:5]}"
