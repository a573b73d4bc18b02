"""A first `make run` shows proxyd's own output: installing proxyd prints no packaging
warnings, and running it installs what running needs, not the test tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import run
from tests.peers.proxyd import PROJECT_ROOT


def make_dry_run(target: str, venv: Path) -> str:
    """What `make TARGET` would run on a fresh checkout (no virtualenv yet)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    return run([make, "-n", "-C", PROJECT_ROOT, target, f"VENV={venv}"], timeout=30).stdout


def test_make_run_installs_proxyd_alone_and_make_test_the_test_tools_too(tmp_path: Path):
    venv = tmp_path / "venv"
    run_steps = make_dry_run("run", venv)
    assert f"{venv}/bin/pip install -q -e .\n" in run_steps
    assert "[dev]" not in run_steps
    assert "[dev]" in make_dry_run("test", venv)


def test_an_editable_install_prints_no_packaging_warning(tmp_path: Path):
    """setuptools warned three times about `project.license` as a table (about 40
    lines each), and once about the import finder of a flat layout's editable install."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=60)
    # This virtualenv's pip (`make` upgrades it), which shows what the build backend
    # warns; older ones kept it to themselves.
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    done = subprocess.run(
        [*pip, "install", "--no-deps", "--no-input", "-e", PROJECT_ROOT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "Warning" not in output, output
