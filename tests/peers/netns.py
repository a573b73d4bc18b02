"""Network namespaces of a test's own (``ip netns``, as root): a container's or a
pod's network, where ``127.0.0.1`` is the namespace's own loopback and a port is
free whatever the rest of the machine runs.

``NetNamespace(veth=True)`` also links it to the test's namespace by a veth pair,
with an address on each end (a /30 of 10.0.0.0/8 that no interface here uses): the
pod's IP, as the kubelet on the node reaches it. ``argv(cmd)`` runs a command inside.
Both ends go when the namespace is stopped.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Sequence
from itertools import count
from typing import Self

import pytest

from tests.peers import PeerError, peers_required, require_binary, run

_serial = count()


class NetNamespace:
    def __init__(self, *, veth: bool = False) -> None:
        self.ip = require_binary("ip")
        if os.geteuid() != 0:
            message = "network namespaces need root"
            if peers_required():
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        self.name = f"proxyd-test-{os.getpid()}-{next(_serial)}"
        self.veth = veth
        self._host_link = f"pdv{os.getpid() % 100000}x{next(_serial) % 1000}"  # <= 15 chars
        self.address: str | None = None  # the inside end, with veth
        self.outside_address: str | None = None  # the end in the test's namespace
        self._started = False

    def _ip(self, *args: str, check: bool = True) -> None:
        run([self.ip, *args], timeout=15, check=check)

    def start(self) -> Self:
        self._ip("netns", "add", self.name)
        self._started = True
        try:
            self._ip("-n", self.name, "link", "set", "lo", "up")
            if self.veth:
                self._link()
        except BaseException:
            self.stop()
            raise
        return self

    def _link(self) -> None:
        prefix = self._free_prefix()
        self.outside_address, self.address = f"{prefix}.1", f"{prefix}.2"
        inside = "eth0"  # created in the namespace: the test's may have an eth0 of its own
        self._ip(
            "link",
            "add",
            self._host_link,
            "type",
            "veth",
            "peer",
            "name",
            inside,
            "netns",
            self.name,
        )
        self._ip("addr", "add", f"{self.outside_address}/30", "dev", self._host_link)
        self._ip("link", "set", self._host_link, "up")
        self._ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", inside)
        self._ip("-n", self.name, "link", "set", inside, "up")

    def _free_prefix(self) -> str:
        used = subprocess.run(
            [self.ip, "-4", "-o", "addr"], capture_output=True, text=True, check=True, timeout=15
        ).stdout
        for _ in range(50):
            prefix = f"10.{random.randrange(100, 250)}.{random.randrange(256)}"
            if f" {prefix}." not in used:
                return prefix
        raise PeerError("no unused 10.x.y.0/30 for a veth pair")

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside the namespace."""
        return [self.ip, "netns", "exec", self.name, *command]

    def stop(self) -> None:
        """Remove the namespace (and with it the veth pair). Processes still inside
        keep it alive: stop them first."""
        if not self._started:
            return
        self._started = False
        self._ip("netns", "delete", self.name, check=False)
        if self.veth:
            self._ip("link", "delete", self._host_link, check=False)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
