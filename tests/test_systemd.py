"""proxyd under systemd: the unit files verify, `serve` says READY=1 only once it
answers and STOPPING=1 when told to stop, and it serves a socket systemd passed it."""

from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxyd import systemd
from proxyd.server.daemon import freeze_startup_heap
from tests.peers import free_port, http_status, require_binary, run, wait_for_http
from tests.peers.children import popen
from tests.peers.proxyd import PROJECT_ROOT

UNITS = PROJECT_ROOT / "systemd"


# -- the unit files ---------------------------------------------------------------------


def _units_with_this_proxyd(directory: Path) -> Path:
    """Copies of the units whose ExecStart runs this checkout's `proxyd` (verify wants
    the binary to exist)."""
    binary = Path(sys.executable).parent / "proxyd"
    assert binary.exists(), f"{binary} missing: is proxyd installed in this venv?"
    service = (UNITS / "proxyd.service").read_text()
    assert "ExecStart=/usr/local/bin/proxyd serve --config /etc/proxyd/proxyd.toml" in service
    (directory / "proxyd.service").write_text(
        service.replace("ExecStart=/usr/local/bin/proxyd", f"ExecStart={binary}")
    )
    shutil.copy(UNITS / "proxyd.socket", directory / "proxyd.socket")
    return directory


def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    units = _units_with_this_proxyd(tmp_path)
    for unit in ("proxyd.service", "proxyd.socket"):
        done = run([analyze, "verify", units / unit], timeout=60, check=False)
        # verify exits 0 on unknown keys and bad values too: only silence is clean.
        assert done.returncode == 0 and not done.stderr.strip(), done.describe()


def test_service_is_hardened(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the exposure of the unit as written (0 is
    best, 10 worst); 2 or less is what a well-confined daemon reaches."""
    analyze = require_binary("systemd-analyze")
    units = _units_with_this_proxyd(tmp_path)
    done = run(
        [analyze, "security", "--offline=yes", units / "proxyd.service"], timeout=60, check=False
    )
    level = re.search(r"Overall exposure level for proxyd\.service: ([\d.]+)", done.stdout)
    assert level, done.describe()
    assert float(level[1]) <= 2.0, done.describe()
    # README states the figure this measures: it may not go above it unnoticed.
    readme = (PROJECT_ROOT / "README.md").read_text()
    stated = re.search(r"`systemd-analyze security --offline=yes`\s+rates it ([\d.]+)", readme)
    assert stated, "README states no figure for `systemd-analyze security --offline=yes`"
    assert float(level[1]) <= float(stated[1]), done.describe()


def test_service_runs_proxyd_as_documented() -> None:
    service = (UNITS / "proxyd.service").read_text()
    settings = dict(
        line.split("=", 1) for line in service.splitlines() if re.match(r"^[A-Z]\w+=", line)
    )
    assert settings["Type"] == "notify"
    assert settings["DynamicUser"] == "yes"
    assert settings["CacheDirectory"] == "proxyd"
    assert settings["CapabilityBoundingSet"] == ""
    assert "Environment=PROXYD_CACHE_DIR=%C/proxyd" in service
    socket_unit = (UNITS / "proxyd.socket").read_text()
    assert "Service=proxyd.service" in socket_unit


# -- sd_notify ------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path is limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_dir / "notify"))
    sock.settimeout(20)
    yield sock
    sock.close()


def test_notify_does_nothing_outside_systemd() -> None:
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "relative/path"}) is False


def test_notify_sends_one_datagram_to_the_socket_path(notify_socket: socket.socket) -> None:
    address = notify_socket.getsockname()
    assert systemd.notify("READY=1\nSTATUS=serving", env={"NOTIFY_SOCKET": address})
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_reaches_an_abstract_socket_named_with_at() -> None:
    name = f"proxyd-test-{os.getpid()}-{free_port()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_to_a_missing_socket_is_no_error(short_dir: Path) -> None:
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(short_dir / "gone")}) is False


def test_listen_fds_for_another_process_are_not_ours_and_are_cleared() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert systemd.listen_fds(env) == []
    assert env == {}


def test_listen_fds_without_a_count_are_none() -> None:
    assert systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}) == []
    assert systemd.listen_fds({}) == []


# -- `proxyd serve` as systemd runs it -------------------------------------------------


def _proxyd_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXYD_", "LISTEN_"))}
    env.pop("NOTIFY_SOCKET", None)
    env |= {"HOME": str(tmp_path), "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}
    return env | extra


def _serve_args(tmp_path: Path, listen: str) -> list[str]:
    return [
        "serve",
        "--listen",
        listen,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-format",
        "json",
        "--default-namespace",
        "docker.io",
    ]


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_serve_notifies_ready_once_it_answers_and_stopping_on_sigterm(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    port = free_port()
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = popen(
            [sys.executable, "-m", "proxyd", *_serve_args(tmp_path, f"127.0.0.1:{port}")],
            env=_proxyd_env(tmp_path, NOTIFY_SOCKET=notify_socket.getsockname()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        ready = notify_socket.recv(4096).decode()
        # The first thing proxyd says is READY=1, and by then it answers.
        assert ready.splitlines()[0] == "READY=1", stderr.read_text()
        assert http_status(f"http://127.0.0.1:{port}/v2/") == 200
        assert f"STATUS=serving on 127.0.0.1:{port}" in ready.splitlines()

        proc.send_signal(signal.SIGTERM)
        stopping = notify_socket.recv(4096).decode()
        assert stopping.splitlines()[0] == "STOPPING=1"
        assert proc.wait(timeout=15) == 0, stderr.read_text()
    finally:
        _stop(proc)


def test_serve_takes_the_listening_socket_systemd_passes_as_fd_3(tmp_path: Path) -> None:
    """As systemd does for proxyd.socket: a bound, listening socket as fd 3, with
    LISTEN_FDS=1 and LISTEN_PID set to proxyd's own pid (exec keeps the pid)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    unused = free_port()  # `listen` names it; proxyd must not listen there
    as_systemd = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.close(int(sys.argv[1]))\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'proxyd', *sys.argv[2:]])\n"
    )
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = popen(
            [
                sys.executable,
                "-c",
                as_systemd,
                str(listener.fileno()),
                *_serve_args(tmp_path, f"127.0.0.1:{unused}"),
            ],
            env=_proxyd_env(tmp_path),
            pass_fds=(listener.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    listener.close()  # proxyd holds the only copy now
    try:
        wait_for_http(
            f"http://127.0.0.1:{port}/healthz",
            accept=lambda status: status == 200,
            timeout=15,
            alive=lambda: None if proc.poll() is None else stderr.read_text(),
            what="proxyd",
        )
        assert http_status(f"http://127.0.0.1:{port}/v2/") == 200
        assert http_status(f"http://127.0.0.1:{unused}/v2/") is None
        assert '"socket_activation":true' in stderr.read_text()
        assert _stop(proc) == 0, stderr.read_text()
    finally:
        _stop(proc)
    assert http_status(f"http://127.0.0.1:{port}/v2/") is None  # closed with proxyd


def test_serve_refuses_an_inherited_descriptor_that_is_no_listening_socket(
    tmp_path: Path,
) -> None:
    """fd 3 is a plain file: a clear `cannot listen` and exit 1, no traceback."""
    as_systemd = (
        "import os, sys\n"
        "fd = os.open(os.devnull, os.O_RDONLY)\n"
        "os.dup2(fd, 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'proxyd', *sys.argv[1:]])\n"
    )
    done = run(
        [sys.executable, "-c", as_systemd, *_serve_args(tmp_path, f"127.0.0.1:{free_port()}")],
        env=_proxyd_env(tmp_path),
        timeout=30,
        check=False,
    )
    assert done.returncode == 1, done.describe()
    assert "cannot listen" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_on_a_port_in_use_says_cannot_listen_and_exits_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run(
            [sys.executable, "-m", "proxyd", *_serve_args(tmp_path, f"127.0.0.1:{port}")],
            env=_proxyd_env(tmp_path),
            timeout=30,
            check=False,
        )
    assert done.returncode == 1, done.describe()
    assert '"event":"cannot listen"' in done.stderr
    assert "address already in use" in done.stderr
    assert "Traceback" not in done.stderr


# -- a long-running process -------------------------------------------------------------


READY_PROBE = """
import gc, os, sys
from proxyd import cli, systemd
notify = systemd.notify
def probe(state, env=None):
    if state.startswith("READY=1"):
        with open(sys.argv[1] + ".part", "w") as out:
            out.write(str(gc.get_freeze_count()))
        os.replace(sys.argv[1] + ".part", sys.argv[1])  # whole when it appears
    return notify(state, env)
systemd.notify = probe
sys.exit(cli.main(sys.argv[2:]))
"""


def test_serve_freezes_its_startup_heap_before_it_says_ready(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen"
    port = free_port()
    proc = popen(
        [
            sys.executable,
            "-c",
            READY_PROBE,
            str(frozen),
            *_serve_args(tmp_path, f"127.0.0.1:{port}"),
        ],
        env=_proxyd_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/", accept=lambda s: s == 200, timeout=30)
        deadline = time.monotonic() + 10  # it listens a moment before it says READY=1
        while not frozen.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert int(frozen.read_text()) > 10_000  # imports, settings, the app
        assert _stop(proc) == 0
    finally:
        _stop(proc)


def test_the_heap_alive_when_serving_starts_is_left_out_of_later_collections():
    gc.unfreeze()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 10_000  # imports, settings, the app
        gc.collect()
        assert gc.get_freeze_count() > 10_000  # a full pass leaves them alone
    finally:
        gc.unfreeze()
