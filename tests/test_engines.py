"""`proxyd init`: what each engine's file says, how existing files are merged and kept,
and the command's behaviour (print, write, refuse). The real engines reading these
files are in tests/e2e/test_init_engines.py."""

from __future__ import annotations

import json
import os
import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxyd import engines
from proxyd.cli import main
from proxyd.config import load_settings
from proxyd.hosts import Capability
from proxyd.hostsfile import build_namespace, parse_hosts_toml
from proxyd.runtime import RuntimeConfig, build_runtime

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def registry_from(tmp_path: Path, config: str, **flags: object) -> RuntimeConfig:
    path = tmp_path / "proxyd.toml"
    path.write_text(config)
    return build_runtime(load_settings(path, **flags))


SEVERAL = """
listen = "127.0.0.1:5000"
[namespaces."docker.io"]
server = "https://registry-1.docker.io"
[namespaces."docker.io".host."https://mirror.example"]
capabilities = ["pull"]
[namespaces."ghcr.io"]
server = "https://ghcr.io"
[namespaces."registry.example:5000"]
server = "https://registry.example:5000"
[namespaces."local.test"]
server = "http://127.0.0.1:5001"
"""


@pytest.fixture(autouse=True)
def _no_proxyd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PROXYD_"):
            monkeypatch.delenv(name)


# -- addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("0.0.0.0:5000", "127.0.0.1:5000"),
        (":5000", "127.0.0.1:5000"),
        ("[::]:5000", "[::1]:5000"),
        ("[::1]:5001", "[::1]:5001"),
        ("localhost:80", "localhost:80"),
        ("192.0.2.7:5000", "192.0.2.7:5000"),
    ],
)
def test_clients_connect_to_a_real_address_never_a_wildcard(listen: str, address: str) -> None:
    assert engines.client_address(listen) == address
    assert engines.mirror_url(listen) == f"http://{address}"


# -- containerd ------------------------------------------------------------------------


def test_containerd_gets_a_hosts_toml_per_namespace_with_proxyd_as_mirror(
    tmp_path: Path,
) -> None:
    registry = registry_from(tmp_path, SEVERAL, listen="0.0.0.0:5000")
    plan = engines.plan_containerd(registry, tmp_path / "certs.d")

    files = {f.path.relative_to(tmp_path / "certs.d").parent.name: f.text for f in plan.files}
    assert sorted(files) == ["docker.io", "ghcr.io", "local.test", "registry.example_5000_"]
    servers = {name: tomllib.loads(text)["server"] for name, text in files.items()}
    assert servers == {
        "docker.io": "https://registry-1.docker.io",  # the upstream, never proxyd's mirrors
        "ghcr.io": "https://ghcr.io",
        "local.test": "http://127.0.0.1:5001",
        "registry.example_5000_": "https://registry.example:5000",
    }
    for text in files.values():
        assert tomllib.loads(text)["host"] == {
            "http://127.0.0.1:5000": {"capabilities": ["pull", "resolve"]}
        }


def test_containerd_file_reads_back_as_a_chain_with_proxyd_first(tmp_path: Path) -> None:
    """proxyd's own hosts.toml reader (containerd's rules) sees proxyd as a pull and
    resolve mirror in front of the same upstream."""
    registry = registry_from(tmp_path, SEVERAL)
    text = engines.render_hosts_toml(registry.namespaces["ghcr.io"], "127.0.0.1:5000")
    chain = build_namespace("ghcr.io", parse_hosts_toml(text), source="test").hosts
    assert [h.origin for h in chain] == ["http://127.0.0.1:5000", "https://ghcr.io"]
    assert chain[0].is_mirror
    assert chain[0].capabilities == Capability.PULL | Capability.RESOLVE
    assert chain[1].path == "/v2"


def test_containerd_server_with_a_path_keeps_it_and_override_path(tmp_path: Path) -> None:
    registry = registry_from(
        tmp_path,
        """
        [namespaces."a.example"]
        server = "https://a.example/mirror/v2"
        [namespaces."b.example"]
        server = "https://b.example/api"
        override_path = true
        """,
    )
    a = tomllib.loads(engines.render_hosts_toml(registry.namespaces["a.example"], ":5000"))
    b = tomllib.loads(engines.render_hosts_toml(registry.namespaces["b.example"], ":5000"))
    assert a["server"] == "https://a.example/mirror/v2"
    assert "override_path" not in a
    assert b["server"] == "https://b.example/api"
    assert b["override_path"] is True


def test_containerd_writes_where_containerd_will_look(tmp_path: Path) -> None:
    """containerd tries `host_port_`, then `host:port`: an existing directory is used
    (it may hold certificates), else the portable spelling."""
    root = tmp_path / "certs.d"
    assert engines.containerd_directory(root, "r.example:5000") == root / "r.example_5000_"
    (root / "r.example:5000").mkdir(parents=True)
    assert engines.containerd_directory(root, "r.example:5000") == root / "r.example:5000"
    (root / "r.example_5000_").mkdir()
    assert engines.containerd_directory(root, "r.example:5000") == root / "r.example_5000_"
    assert engines.containerd_directory(root, "docker.io") == root / "docker.io"


def test_containerd_default_directory_when_proxyd_serves_any_registry(tmp_path: Path) -> None:
    registry = registry_from(tmp_path, "allow_unconfigured_namespaces = true\n")
    plan = engines.plan_containerd(registry, tmp_path / "certs.d")
    default = next(f for f in plan.files if f.path.parent.name == "_default")
    parsed = tomllib.loads(default.text)
    assert "server" not in parsed  # containerd then uses the registry of the image name
    assert list(parsed["host"]) == ["http://127.0.0.1:5000"]


def test_containerd_refuses_to_write_into_proxyds_own_hosts_dir(tmp_path: Path) -> None:
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "ghcr.io").mkdir(parents=True)
    (hosts_dir / "ghcr.io" / "hosts.toml").write_text('server = "https://ghcr.io"\n')
    registry = registry_from(tmp_path, "", hosts_dir=hosts_dir)
    with pytest.raises(engines.InitError, match="its own mirror"):
        engines.plan_containerd(registry, hosts_dir)


# -- docker ----------------------------------------------------------------------------


def test_docker_daemon_json_is_created_with_the_mirror() -> None:
    text = engines.render_daemon_json(None, "http://127.0.0.1:5000")
    assert json.loads(text) == {"registry-mirrors": ["http://127.0.0.1:5000"]}


def test_docker_daemon_json_keeps_every_other_key_and_mirror() -> None:
    existing = json.dumps(
        {"log-driver": "journald", "registry-mirrors": ["https://m.example"], "debug": True}
    )
    merged = json.loads(engines.render_daemon_json(existing, "http://127.0.0.1:5000"))
    assert merged == {
        "log-driver": "journald",
        "registry-mirrors": ["http://127.0.0.1:5000", "https://m.example"],
        "debug": True,
    }
    assert list(merged) == ["log-driver", "registry-mirrors", "debug"]


@pytest.mark.parametrize("listed", ["http://127.0.0.1:5000", "http://127.0.0.1:5000/"])
def test_docker_daemon_json_naming_the_mirror_is_left_exactly_as_it_is(listed: str) -> None:
    existing = '{"registry-mirrors": ["' + listed + '"],   "debug": true}'
    assert engines.render_daemon_json(existing, "http://127.0.0.1:5000") == existing


@pytest.mark.parametrize(
    ("existing", "complaint"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"registry-mirrors": "http://x"}', "must be a list"),
    ],
)
def test_docker_daemon_json_that_cannot_be_merged_is_refused(existing: str, complaint: str) -> None:
    with pytest.raises(engines.InitError, match=complaint):
        engines.render_daemon_json(existing, "http://127.0.0.1:5000")


def test_docker_is_docker_hub_only_and_says_so(tmp_path: Path) -> None:
    registry = registry_from(tmp_path, SEVERAL)
    plan = engines.plan_docker(registry, tmp_path / "daemon.json", None)
    assert any("Docker Hub only" in note and "ghcr.io" in note for note in plan.notes)
    assert any("insecure-registries" in note for note in plan.notes)


def test_docker_needs_docker_hub_as_the_default_namespace(tmp_path: Path) -> None:
    registry = registry_from(tmp_path, SEVERAL, default_namespace="ghcr.io")
    with pytest.raises(engines.InitError, match=re.escape('default_namespace = "docker.io"')):
        engines.plan_docker(registry, tmp_path / "daemon.json", None)


# -- podman ----------------------------------------------------------------------------


def test_podman_mirrors_the_default_at_the_root_and_others_by_path_prefix(
    tmp_path: Path,
) -> None:
    registry = registry_from(tmp_path, SEVERAL)
    text, notes = engines.render_registries_conf(registry)
    entries = tomllib.loads(text)["registry"]
    assert [e["location"] for e in entries] == ["docker.io", "ghcr.io", "local.test"]
    mirrors = {e["location"]: e["mirror"] for e in entries}
    assert mirrors["docker.io"] == [{"location": "127.0.0.1:5000", "insecure": True}]
    assert mirrors["ghcr.io"] == [{"location": "127.0.0.1:5000/ghcr.io", "insecure": True}]
    insecure = {e["location"]: e.get("insecure", False) for e in entries}
    assert insecure == {"docker.io": False, "ghcr.io": False, "local.test": True}
    assert any(note.startswith("registry.example:5000: not written") for note in notes)


def test_podman_default_namespace_with_a_port_is_mirrored_at_the_root(tmp_path: Path) -> None:
    registry = registry_from(tmp_path, SEVERAL, default_namespace="registry.example:5000")
    entries = tomllib.loads(engines.render_registries_conf(registry)[0])["registry"]
    assert entries[0]["location"] == "registry.example:5000"
    assert entries[0]["mirror"] == [{"location": "127.0.0.1:5000", "insecure": True}]
    assert {"location": "127.0.0.1:5000/docker.io", "insecure": True} in entries[1]["mirror"]


# -- writing ---------------------------------------------------------------------------


def test_write_creates_a_file_and_its_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file.conf"
    written = engines.write_file(path, "x = 1\n", now=NOW)
    assert written == engines.Written(path, engines.Outcome.CREATED)
    assert path.read_text() == "x = 1\n"
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_of_the_same_content_touches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "file.conf"
    path.write_text("x = 1\n")
    os.utime(path, (1, 1))
    written = engines.write_file(path, "x = 1\n", now=NOW)
    assert written.outcome is engines.Outcome.UNCHANGED
    assert path.stat().st_mtime == 1
    assert list(tmp_path.iterdir()) == [path]


def test_write_backs_up_what_it_replaces_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_text("old\n")
    path.chmod(0o600)
    first = engines.write_file(path, "new\n", now=NOW)
    second = engines.write_file(path, "newer\n", now=NOW)

    assert first.outcome is engines.Outcome.UPDATED
    assert first.backup == tmp_path / "daemon.json.bak-20260102T030405Z"
    assert second.backup == tmp_path / "daemon.json.bak-20260102T030405Z-1"
    assert first.backup.read_text() == "old\n"
    assert second.backup.read_text() == "new\n"
    assert path.read_text() == "newer\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_backups_are_not_read_by_the_engines(tmp_path: Path) -> None:
    """podman reads `registries.conf.d/*.conf`, containerd `hosts.toml`."""
    backup = engines.backup_path(tmp_path / "proxyd.conf", NOW)
    assert not backup.name.endswith(".conf")


def test_write_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    with pytest.raises(engines.InitError, match="plain is not a directory"):
        engines.write_file(tmp_path / "plain" / "daemon.json", "{}\n")


# -- the command -----------------------------------------------------------------------


def test_init_print_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "proxyd.toml"
    config.write_text(SEVERAL)
    daemon_json = tmp_path / "daemon.json"

    code = main(["init", "docker", "--config", str(config), "--file", str(daemon_json), "--print"])

    out, err = capsys.readouterr()
    assert code == 0
    assert json.loads(out) == {"registry-mirrors": ["http://127.0.0.1:5000"]}
    assert f"==> {daemon_json} (would write) <==" in err
    assert not daemon_json.exists()


def test_init_containerd_writes_then_finds_nothing_to_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "proxyd.toml"
    config.write_text(SEVERAL)
    root = tmp_path / "certs.d"
    args = ["init", "containerd", "--config", str(config), "--dir", str(root)]

    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args) == 0
    second = capsys.readouterr()

    assert first.out.count("created") == 4
    assert "config_path" in first.err  # what to do next
    assert second.out.count("unchanged") == 4
    assert "config_path" not in second.err
    assert (root / "ghcr.io" / "hosts.toml").exists()


def test_init_podman_uses_the_listen_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "registries.conf.d" / "proxyd.conf"
    assert main(["init", "podman", "--listen", "0.0.0.0:5050", "--file", str(target)]) == 0
    entries = tomllib.loads(target.read_text())["registry"]
    assert entries == [
        {"location": "docker.io", "mirror": [{"location": "127.0.0.1:5050", "insecure": True}]}
    ]


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_init_to_an_unwritable_path_exits_2_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    (tmp_path / "plain").write_text("")
    code = main(["init", engine, "--file", str(tmp_path / "plain" / "conf")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("proxyd: cannot write")
    assert "Traceback" not in err


def test_init_docker_with_broken_daemon_json_exits_2_and_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text("{broken")
    assert main(["init", "docker", "--file", str(daemon_json)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert daemon_json.read_text() == "{broken"
    assert list(tmp_path.iterdir()) == [daemon_json]
