"""The files for running proxyd elsewhere (Dockerfile, config/examples/) parse, hold
configurations proxyd accepts, and keep the promises made in their comments: loopback
only, a non-root user, health checks on /healthz and /readyz. No engine builds the
image here; this checks what can be checked without one (tests/e2e/test_deployment_probes.py
runs the health checks themselves)."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxyd import engines
from proxyd.config import load_settings
from proxyd.hostsfile import build_namespace, load_hosts_dir
from proxyd.runtime import build_runtime
from tests.peers.proxyd import PROJECT_ROOT

EXAMPLES = PROJECT_ROOT / "config" / "examples"


def load_yaml(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def kubernetes_env(container: dict[str, Any], **fields: str) -> dict[str, str]:
    """The container's environment as the kubelet makes it: `valueFrom` fields from
    `fields` (the downward API's, by path), `$(NAME)` of a variable defined before."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), entry["value"])
        env[entry["name"]] = value
    return env


def proxyd_accepts(tmp_path: Path, text: str, **flags: Any) -> Any:
    path = tmp_path / "proxyd.toml"
    path.write_text(text)
    return build_runtime(load_settings(path, **flags))


@pytest.fixture(autouse=True)
def _no_proxyd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("PROXYD_")]:
        monkeypatch.delenv(name)


# -- Dockerfile ------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), by stage."""
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_builds_in_one_stage_and_runs_from_slim_in_another() -> None:
    builder, final = dockerfile_stages()
    assert builder[0] == ("FROM", "python:3.11-slim AS builder")
    assert any(i == "RUN" and "pip wheel" in a and "--prefix" in a for i, a in builder)
    assert final[0] == ("FROM", "python:3.11-slim")
    assert ("COPY", "--from=builder /install /usr/local") in final
    assert not any(i == "RUN" and "pip install" in a for i, a in final)


def test_dockerfile_runs_proxyd_as_a_user_of_its_own() -> None:
    users = [a.split(":")[0] for i, a in dockerfile_stages()[-1] if i == "USER"]
    assert users, "the final stage sets no USER: proxyd would run as root"
    assert not {"root", "0"} & set(users)


def test_dockerfile_serves_on_5000_with_a_health_check_and_a_cache_volume() -> None:
    final = dict(dockerfile_stages()[-1][::-1])  # the last of each instruction
    assert final["HEALTHCHECK"].endswith(' CMD ["proxyd", "health"]')  # /healthz, as served
    assert final["EXPOSE"] == "5000"
    assert final["VOLUME"] == "/var/cache/proxyd"
    assert final["ENTRYPOINT"] == '["proxyd"]'
    assert final["CMD"] == '["serve"]'
    env = " ".join(a for i, a in dockerfile_stages()[-1] if i == "ENV")
    for setting in (
        "PROXYD_CACHE_DIR=/var/cache/proxyd",
        "PROXYD_LISTEN=0.0.0.0:5000",
        "PROXYD_LOG_FORMAT=json",
    ):
        assert setting in env


def test_dockerfile_needs_nothing_but_its_base_image_and_pypi() -> None:
    """No parser directive: `# syntax=` makes BuildKit fetch a frontend image first."""
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    sources = {a.split()[0] for stage in dockerfile_stages() for i, a in stage if i == "FROM"}
    assert sources == {"python:3.11-slim"}


def test_dockerfile_carries_no_secrets() -> None:
    for stage in dockerfile_stages():
        for instruction, args in stage:
            if instruction in ("ENV", "ARG", "LABEL"):
                assert not re.search(r"(PASSWORD|SECRET|TOKEN|CREDENTIAL)", args, re.I), args
            if instruction in ("COPY", "ADD"):
                assert not re.search(r"(\.docker|config\.json|\.netrc|id_rsa|\.env)", args), args


def test_dockerignore_lets_only_the_sources_into_the_build_context() -> None:
    rules = [
        line.strip()
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"  # an allow-list: .git, .venv, caches and secrets stay out
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {
        source
        for i, a in dockerfile_stages()[0] + dockerfile_stages()[-1]
        if i == "COPY" and not a.startswith("--from")
        for source in a.split()[:-1]
    }
    assert copied == {"pyproject.toml", "README.md", "proxyd", "config/proxyd.toml"}
    assert copied <= allowed


def test_the_config_the_image_ships_is_the_default_one(tmp_path: Path) -> None:
    final = dockerfile_stages()[-1]
    assert ("COPY", "config/proxyd.toml /etc/proxyd/proxyd.toml") in final
    proxyd_accepts(tmp_path, (PROJECT_ROOT / "config" / "proxyd.toml").read_text())


# -- config/examples ---------------------------------------------------------------------


def test_example_proxyd_toml_loads(tmp_path: Path) -> None:
    registry = proxyd_accepts(tmp_path, (EXAMPLES / "proxyd.toml").read_text())
    assert sorted(registry.namespaces) == ["docker.io", "ghcr.io", "registry.example:5000"]


def test_example_certs_d_is_what_proxyd_init_writes_and_containerd_style_loads(
    tmp_path: Path,
) -> None:
    registry = proxyd_accepts(
        tmp_path, (EXAMPLES / "proxyd.toml").read_text(), listen="127.0.0.1:5000"
    )
    plan = engines.plan_containerd(registry, EXAMPLES / "certs.d")
    for rendered in plan.files:
        assert rendered.path.read_text() == rendered.text, f"{rendered.path} is out of date"
    assert len(plan.files) == len(list((EXAMPLES / "certs.d").glob("*/hosts.toml")))
    for name, hosts_file in load_hosts_dir(EXAMPLES / "certs.d").items():
        chain = build_namespace(name, hosts_file.settings, source="example").hosts
        assert [h.origin for h in chain] == [
            "http://127.0.0.1:5000",
            registry.namespaces[name].hosts[-1].origin,
        ]


def test_daemonset_serves_each_node_on_its_loopback(tmp_path: Path) -> None:
    docs = load_yaml("kubernetes-daemonset.yaml")
    (daemonset,) = by_kind(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (proxyd,) = pod["containers"]
    env = env_of(proxyd)
    assert env["PROXYD_LISTEN"] == "127.0.0.1:5000"  # never the node's other addresses
    probes = {name: proxyd[name]["httpGet"] for name in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"] == {"host": "127.0.0.1", "port": 5000, "path": "/readyz"}
    assert probes["livenessProbe"] == {"host": "127.0.0.1", "port": 5000, "path": "/healthz"}
    assert proxyd["securityContext"]["runAsNonRoot"] is True
    assert proxyd["securityContext"]["runAsUser"] != 0


def test_daemonset_nodes_form_a_fleet_reached_on_the_node_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = load_yaml("kubernetes-daemonset.yaml")
    (daemonset,) = by_kind(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (proxyd,) = pod["containers"]
    env = kubernetes_env(proxyd, **{"status.hostIP": "10.0.0.7"})
    assert env["PROXYD_CLUSTER__ADVERTISE"] == "http://10.0.0.7:5001"
    assert env["PROXYD_CLUSTER__LISTEN"] == "10.0.0.7:5001"
    assert env["PROXYD_LISTEN"] == "127.0.0.1:5000"  # the registry API stays local
    ports = {p["name"]: (p["containerPort"], p["hostPort"]) for p in proxyd["ports"]}
    assert ports["peers"] == (5001, 5001)
    mounts = {m["name"]: m["mountPath"] for m in proxyd["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_dir = Path(env["PROXYD_CLUSTER__SECRET_FILE"]).parent
    assert mounts["fleet-secret"] == str(secret_dir)
    assert volumes["fleet-secret"]["secret"]["secretName"] == "proxyd-fleet"
    assert pod["securityContext"]["fsGroup"] == proxyd["securityContext"]["runAsGroup"]

    # The settings load as the container would read them, the secret from its file.
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    env["PROXYD_CLUSTER__SECRET_FILE"] = str(secret)
    for name, value in env.items():
        if name.startswith("PROXYD_CLUSTER__"):
            monkeypatch.setenv(name, value)
    maps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    runtime = proxyd_accepts(tmp_path, maps["proxyd-config"]["proxyd.toml"])
    cluster = runtime.settings.cluster
    assert cluster is not None and cluster.advertise == "http://10.0.0.7:5001"
    assert runtime.peer_secret is not None


def test_daemonset_config_maps_hold_the_example_files(tmp_path: Path) -> None:
    docs = load_yaml("kubernetes-daemonset.yaml")
    maps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    config = maps["proxyd-config"]["proxyd.toml"]
    assert config == (EXAMPLES / "proxyd.toml").read_text()
    registry = proxyd_accepts(tmp_path, config, listen="127.0.0.1:5000")
    hosts = maps["proxyd-containerd-hosts"]
    expected = {
        f.path.parent.name: f.text
        for f in engines.plan_containerd(registry, tmp_path / "certs.d").files
    }
    assert hosts == expected
    for text in hosts.values():
        tomllib.loads(text)
    (daemonset,) = by_kind(docs, "DaemonSet")
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    items = volumes["containerd-hosts"]["configMap"]["items"]
    assert {i["key"]: i["path"] for i in items} == {k: f"{k}/hosts.toml" for k in hosts}
    assert volumes["certs-d"]["hostPath"]["path"] == "/etc/containerd/certs.d"


def test_sidecar_serves_the_pod_on_loopback_and_its_config_loads(tmp_path: Path) -> None:
    docs = load_yaml("sidecar.yaml")
    (config_map,) = by_kind(docs, "ConfigMap")
    proxyd_accepts(tmp_path, config_map["data"]["proxyd.toml"])
    (pod,) = by_kind(docs, "Pod")
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "proxyd"]
    assert sidecar["restartPolicy"] == "Always"
    assert env_of(sidecar)["PROXYD_LISTEN"] == "127.0.0.1:5000"
    # The kubelet's httpGet would go to the pod's IP: proxyd is not there.
    assert sidecar["startupProbe"]["exec"]["command"] == ["proxyd", "health", "--ready"]
    assert sidecar["livenessProbe"]["exec"]["command"] == ["proxyd", "health"]
    assert sidecar["securityContext"]["runAsNonRoot"] is True


def test_compose_publishes_on_loopback_and_mounts_a_config_that_loads(tmp_path: Path) -> None:
    (compose,) = load_yaml("docker-compose.yaml")
    service = compose["services"]["proxyd"]
    assert (EXAMPLES / service["build"] / "Dockerfile").exists()
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    mounts = [v.split(":") for v in service["volumes"] if v.startswith("./")]
    for source, target, *_ in mounts:
        assert target == service["environment"]["PROXYD_CONFIG"]
        proxyd_accepts(tmp_path, (EXAMPLES / source).read_text())
    assert "proxyd-cache" in compose["volumes"]
