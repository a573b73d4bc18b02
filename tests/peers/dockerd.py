"""A private docker engine (Debian's ``docker.io``, dockerd 20.10) and its CLI.

``Dockerd(workdir, config_file=…)`` runs ``dockerd`` as root with no networking of
its own (no iptables, bridge, forwarding, masquerading or userland proxy), the vfs
storage driver, and everything it keeps (data root, exec root, pidfile, its unix
socket, the containerd it starts) under temporary directories; the host's
``/etc/docker/daemon.json`` is never read (a ``{}`` stands in when no file is given).
``start()`` waits, bounded, until ``docker version`` answers; ``stop()`` (SIGTERM,
then SIGKILL) also ends the containerd it started, should dockerd have left it.

``docker(*args)`` runs the CLI against this daemon alone, with a HOME of its own so
no ``~/.docker/config.json`` (credentials, another context) changes what it does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

from tests.peers import Completed, PeerError, require_binary, run, stop_process
from tests.peers.children import popen

START_TIMEOUT = 60.0  # a first start on vfs, on a loaded 2-core machine
COMMAND_TIMEOUT = 120.0
NO_NETWORKING = (
    "--iptables=false",
    "--ip6tables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--bridge=none",
    "--userland-proxy=false",
    "--storage-driver=vfs",
)


def docker_cli(dockerd: str) -> str:
    """The CLI of the same package (``/usr/bin/docker`` beside ``/usr/sbin/dockerd``),
    else whichever ``docker`` is on PATH."""
    beside = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_binary("docker")


class Dockerd:
    def __init__(self, workdir: Path, *, config_file: Path | None = None) -> None:
        self.dockerd = require_binary("dockerd")
        self.cli = docker_cli(self.dockerd)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        if config_file is None:
            config_file = workdir / "daemon.json"
            config_file.write_text("{}\n")
        self.config_file = config_file
        # Unix socket paths are limited to 108 bytes: the exec root (containerd's
        # sockets) and docker's socket get a short directory of their own.
        self.short = Path(tempfile.mkdtemp(prefix="dkr-", dir="/tmp"))
        self.socket = self.short / "docker.sock"
        self.log_path = workdir / "dockerd.log"
        self.home = workdir / "home"
        self.home.mkdir(exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            self.dockerd,
            *NO_NETWORKING,
            f"--data-root={self.workdir / 'data'}",
            f"--exec-root={self.short / 'exec'}",
            f"--pidfile={self.short / 'docker.pid'}",
            f"--host=unix://{self.socket}",
            f"--config-file={self.config_file}",
        ]

    def start(self) -> Self:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        env["HOME"] = str(self.home)
        with self.log_path.open("ab") as log:
            self._proc = popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                self.stop()
                raise PeerError(f"dockerd exited with {self._proc.returncode}:\n{self.log()}")
            if self.socket.exists() and self.docker("version", check=False).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"dockerd did not answer within {START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, grace=20)
            self._proc = None
        self._end_its_containerd()
        shutil.rmtree(self.short, ignore_errors=True)

    def _end_its_containerd(self) -> None:
        """dockerd stops the containerd it started, unless it was killed first."""
        pidfile = self.short / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log(self, last: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-last:]

    # -- the CLI ---------------------------------------------------------------------

    def docker(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> Completed:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)}
        env["DOCKER_CONFIG"] = str(self.home / ".docker")
        argv = [self.cli, f"--host=unix://{self.socket}", *args]
        done = run(argv, timeout=timeout, env=env, check=False)
        if check and done.returncode != 0:
            raise PeerError(f"docker failed\n{done.describe()}\n--- dockerd ---\n{self.log()}")
        return done

    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.docker("info", "--format", "{{json .}}").stdout))

    def pull(self, ref: str) -> Completed:
        return self.docker("pull", ref)

    def rmi(self, ref: str) -> Completed:
        return self.docker("rmi", ref)

    def image_inspect(self, ref: str) -> dict[str, Any]:
        [found] = json.loads(self.docker("image", "inspect", ref).stdout)
        return dict(found)
