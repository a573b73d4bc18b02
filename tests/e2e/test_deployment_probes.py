"""The health checks of the Dockerfile and the Kubernetes examples pass where they run.

Each container gets a network namespace of its own (tests/peers/netns.py), so
``127.0.0.1`` is the container's loopback as in a pod, and the examples' addresses
and ports are used as written. proxyd runs there with the environment the image and
the pod spec give it (their paths moved under the test's directory), and each probe
runs the way its runner would: an exec probe or the image's HEALTHCHECK inside the
container, with the container's environment; an httpGet probe from the kubelet,
which sits in the node's network, to the probe's ``host`` or else the pod's IP.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.peers import Completed, PeerError, run, stop_process
from tests.peers.children import popen
from tests.peers.netns import NetNamespace
from tests.peers.proxyd import PROJECT_ROOT
from tests.test_deployment_files import (
    by_kind,
    dockerfile_stages,
    env_of,
    kubernetes_env,
    load_yaml,
)

pytestmark = pytest.mark.peers

CLOSED = "redis://127.0.0.1:1/0"  # nothing listens there: connecting is refused at once

START_TIMEOUT = 20.0
VENV_BIN = Path(sys.executable).parent  # where `proxyd` is, as /usr/local/bin in the image

# The kubelet's httpGet: any status from 200 to 399 passes; HTTPS is not verified.
KUBELET_HTTP_GET = """
import ssl, sys, urllib.error, urllib.request
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
try:
    status = urllib.request.urlopen(sys.argv[1], timeout=5, context=context).status
except urllib.error.HTTPError as err:
    status = err.code
except OSError as err:
    sys.exit(f"{sys.argv[1]}: {err}")
sys.exit(0 if 200 <= status < 400 else f"{sys.argv[1]}: {status}")
"""


def image_env() -> dict[str, str]:
    """The final stage's ENV, as the image sets it."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile_stages()[-1]:
        if instruction == "ENV":
            env |= dict(word.split("=", 1) for word in shlex.split(args))
    return env


def container_env(
    workdir: Path,
    env: Mapping[str, str],
    config_text: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """`env` (the image's, then the container's), with the configuration file and the
    cache moved under `workdir`, and this checkout's `proxyd` first on PATH."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "proxyd.toml"
    config.write_text(config_text)
    base = {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(workdir),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    moved = {"PROXYD_CONFIG": str(config), "PROXYD_CACHE_DIR": str(workdir / "cache")}
    return base | dict(env) | moved | dict(extra or {})


@contextmanager
def daemon(
    netns: NetNamespace, argv: Sequence[str], env: Mapping[str, str], log: Path
) -> Iterator[None]:
    """proxyd started inside `netns`, until it logs that it listens; stopped after."""
    with log.open("ab") as out:
        proc = popen(
            netns.argv(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while '"event":"listening"' not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PeerError(f"proxyd did not start in {netns.name}:\n{log.read_text()}")
            time.sleep(0.05)
        yield
    finally:
        stop_process(proc)


def exec_in(netns: NetNamespace, command: Sequence[str], env: Mapping[str, str]) -> Completed:
    return run(netns.argv(command), env=env, timeout=30, check=False)


def kubelet_probe(
    probe: dict[str, Any],
    *,
    pod: NetNamespace,
    env: Mapping[str, str],
    kubelet: NetNamespace | None,
) -> Completed:
    """Run `probe` as the kubelet would; `kubelet` is the node's network (None: the
    test's own)."""
    if "exec" in probe:
        return exec_in(pod, probe["exec"]["command"], env)
    get = probe["httpGet"]
    host = get.get("host") or pod.address
    assert host is not None, "an httpGet probe without host reaches the pod by its IP"
    url = f"{get.get('scheme', 'HTTP').lower()}://{host}:{get['port']}{get.get('path', '/')}"
    argv = [sys.executable, "-c", KUBELET_HTTP_GET, url]
    return run(kubelet.argv(argv) if kubelet else argv, timeout=30, check=False)


def probes_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = ("startupProbe", "readinessProbe", "livenessProbe")
    return {name: container[name] for name in names if name in container}


# -- Kubernetes ----------------------------------------------------------------------------


def test_sidecar_probes_pass_when_the_kubelet_runs_them_from_the_node(tmp_path: Path) -> None:
    docs = load_yaml("sidecar.yaml")
    (config_map,) = by_kind(docs, "ConfigMap")
    (pod_spec,) = by_kind(docs, "Pod")
    (sidecar,) = [c for c in pod_spec["spec"]["initContainers"] if c["name"] == "proxyd"]
    env = container_env(
        tmp_path / "sidecar", image_env() | env_of(sidecar), config_map["data"]["proxyd.toml"]
    )

    with (
        NetNamespace(veth=True) as pod,
        daemon(pod, ["proxyd", *sidecar["args"]], env, tmp_path / "log"),
    ):
        results = {
            name: kubelet_probe(probe, pod=pod, env=env, kubelet=None)
            for name, probe in probes_of(sidecar).items()
        }
        # proxyd serves the pod alone: from the node, its port on the pod's IP is closed.
        outside = kubelet_probe(
            {"httpGet": {"port": 5000, "path": "/healthz"}}, pod=pod, env=env, kubelet=None
        )

    assert set(results) == {"startupProbe", "livenessProbe"}
    for name, done in results.items():
        assert done.returncode == 0, f"{name}:\n{done.describe()}"
    assert outside.returncode != 0 and "refused" in outside.stderr, outside.describe()


def test_daemonset_probes_pass_on_the_node_network(tmp_path: Path) -> None:
    docs = load_yaml("kubernetes-daemonset.yaml")
    maps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    (daemonset,) = by_kind(docs, "DaemonSet")
    pod_spec = daemonset["spec"]["template"]["spec"]
    assert pod_spec["hostNetwork"] is True  # the pod's network is the node's
    (proxyd,) = pod_spec["containers"]
    config = maps["proxyd-config"]["proxyd.toml"]
    secret = tmp_path / "fleet-secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    # The fleet's Redis is not there: the node works alone, and is ready all the same.
    fleet = {"PROXYD_CLUSTER__SECRET_FILE": str(secret), "PROXYD_CLUSTER__REDIS_URL": CLOSED}

    with NetNamespace(veth=True) as node:
        assert node.address is not None
        container = kubernetes_env(proxyd, **{"status.hostIP": node.address})
        env = container_env(tmp_path / "node", image_env() | container, config, fleet)
        with daemon(node, ["proxyd", *proxyd["args"]], env, tmp_path / "log"):
            results = {
                name: kubelet_probe(probe, pod=node, env=env, kubelet=node)
                for name, probe in probes_of(proxyd).items()
            }
            peers = kubelet_probe(
                {"httpGet": {"host": node.address, "port": 5001, "path": "/healthz"}},
                pod=node,
                env=env,
                kubelet=node,
            )

    assert set(results) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for name, done in results.items():
        assert done.returncode == 0, f"{name}:\n{done.describe()}"
    assert peers.returncode == 0, f"the peer listener on the node address:\n{peers.describe()}"


# -- the image's HEALTHCHECK ---------------------------------------------------------------


def healthcheck_command() -> list[str]:
    final = dict(dockerfile_stages()[-1][::-1])
    options, _, command = final["HEALTHCHECK"].partition("CMD ")
    assert "--timeout=" in options
    argv = json.loads(command)  # the exec form: no shell in the way
    assert isinstance(argv, list)
    return argv


def test_image_healthcheck_passes_over_http_and_https_and_fails_while_proxyd_is_down(
    tmp_path: Path,
) -> None:
    final = dict(dockerfile_stages()[-1][::-1])
    entrypoint = json.loads(final["ENTRYPOINT"]) + json.loads(final["CMD"])
    shipped = (PROJECT_ROOT / "config" / "proxyd.toml").read_text()
    ca = trustme.CA()
    server = ca.issue_cert("proxyd.example")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    server.cert_chain_pems[0].write_to_path(cert)
    server.private_key_pem.write_to_path(key)
    plain = container_env(tmp_path / "plain", image_env(), shipped)
    # docker run -e PROXYD_TLS_CERT=… -e PROXYD_TLS_KEY=…
    https = container_env(
        tmp_path / "https",
        image_env(),
        shipped,
        {"PROXYD_TLS_CERT": str(cert), "PROXYD_TLS_KEY": str(key)},
    )
    check = healthcheck_command()

    with NetNamespace() as container:
        before = exec_in(container, check, plain)
        with daemon(container, entrypoint, plain, tmp_path / "plain.log"):
            over_http = exec_in(container, check, plain)
        with daemon(container, entrypoint, https, tmp_path / "https.log"):
            over_https = exec_in(container, check, https)
        after = exec_in(container, check, https)

    assert over_http.returncode == 0, over_http.describe()
    assert over_https.returncode == 0, over_https.describe()
    assert "https://127.0.0.1:5000/healthz answered 200" in over_https.stdout
    for down in (before, after):
        assert down.returncode == 1, down.describe()
        assert "connection refused" in down.stderr
