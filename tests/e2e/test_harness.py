"""The harness itself, against the real peers and without proxyd.

If these fail, the proxyd tests beside them prove nothing: each shows that a peer
does what the proxyd tests rely on.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import ALICE_CREDS
from tests.peers import (
    REQUIRE_PEERS_ENV,
    PeerError,
    http_request,
    http_status,
    require_binary,
)
from tests.peers.clients import (
    Containerd,
    Podman,
    Skopeo,
    registries_conf_with_mirror,
    write_hosts_toml,
)
from tests.peers.image import BuiltImage, PushedImage, build_image
from tests.peers.mirrors import FaultyMirror
from tests.peers.registry import Registry
from tests.peers.tokenserver import TokenServer

pytestmark = pytest.mark.peers


def test_image_build_is_deterministic(tmp_path: Path, image: BuiltImage) -> None:
    again = build_image(tmp_path / "again", seed=1)
    assert again.manifest_digest == image.manifest_digest
    assert again.blob_digests == image.blob_digests
    assert len(image.layer_digests) == 3


def test_skopeo_round_trip_through_plain_registry(skopeo: Skopeo, plain_image: PushedImage) -> None:
    pulled = skopeo.pull_to_dir(plain_image.ref)
    assert pulled.manifest_digest == plain_image.manifest_digest
    assert pulled.blob_digests == set(plain_image.blob_digests)


def test_registry_log_counts_the_blobs_it_served(
    skopeo: Skopeo, plain_registry: Registry, plain_image: PushedImage
) -> None:
    before = len(plain_registry.blob_gets())
    skopeo.pull_to_dir(plain_image.ref)
    served = plain_registry.blob_gets()[before:]
    assert sorted(r.path.rpartition("/")[2] for r in served) == sorted(plain_image.blob_digests)


def test_docker_schema2_image_keeps_its_digest(
    skopeo: Skopeo, token_docker_image: PushedImage
) -> None:
    pulled = skopeo.pull_to_dir(token_docker_image.ref, creds=ALICE_CREDS)
    assert pulled.manifest_digest == token_docker_image.manifest_digest
    assert (
        pulled.manifest_json["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    )


def test_token_registry_serves_alice_and_refuses_anonymous(
    skopeo: Skopeo, token_registry: Registry, token_server: TokenServer, token_image: PushedImage
) -> None:
    pulled = skopeo.pull_to_dir(token_image.ref, creds=ALICE_CREDS)
    assert pulled.manifest_digest == token_image.manifest_digest

    with pytest.raises(PeerError, match="requested access to the resource is denied"):
        skopeo.pull_to_dir(token_image.ref)

    granted = [t for t in token_server.issued() if t.subject == "alice"][-1]
    assert granted.claims["aud"] == token_registry.token_service
    assert granted.claims["iss"] == token_server.issuer
    assert {"type": "repository", "name": "team/app", "actions": ["pull"]} in granted.access


def test_token_registry_serves_public_repositories_anonymously(
    skopeo: Skopeo, image: BuiltImage, token_registry: Registry
) -> None:
    skopeo.push(image.source, f"{token_registry.host}/public/app:v1", creds=ALICE_CREDS)
    pulled = skopeo.pull_to_dir(f"{token_registry.host}/public/app:v1")
    assert pulled.manifest_digest == image.manifest_digest


def test_token_server_oauth2_password_and_refresh_grants(
    token_server: TokenServer, token_registry: Registry
) -> None:
    service = token_registry.token_service
    assert service is not None

    def post(form: dict[str, str]) -> tuple[int, dict[str, object]]:
        answer = http_request(
            "POST",
            token_server.realm,
            data=urllib.parse.urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        return answer.status, json.loads(answer.body)

    status, body = post(
        {
            "grant_type": "password",
            "username": "alice",
            "password": "wonderland",
            "service": service,
            "scope": "repository:team/app:pull repository:team/other:pull,push",
            "client_id": "proxyd-tests",
            "access_type": "offline",
        }
    )
    assert status == 200
    assert body["token"] == body["access_token"]
    claims = token_server.decode(str(body["access_token"]), audience=service)
    assert claims["sub"] == "alice"
    assert claims["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull"]},
        {"type": "repository", "name": "team/other", "actions": ["pull", "push"]},
    ]
    assert {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "access"} <= claims.keys()

    status, refreshed = post(
        {
            "grant_type": "refresh_token",
            "refresh_token": str(body["refresh_token"]),
            "service": service,
            "scope": "repository:team/app:pull",
        }
    )
    assert status == 200
    assert "refresh_token" not in refreshed
    assert token_server.decode(str(refreshed["access_token"]), audience=service)["sub"] == "alice"

    status, _ = post({"grant_type": "password", "username": "alice", "password": "nope"})
    assert status == 401
    status, _ = post({"grant_type": "refresh_token", "refresh_token": "forged"})
    assert status == 400


def test_token_server_anonymous_get_grants_only_public_pull(
    token_server: TokenServer, token_registry: Registry
) -> None:
    query = urllib.parse.urlencode(
        [
            ("service", token_registry.token_service or ""),
            ("scope", "repository:public/app:pull,push"),
            ("scope", "repository:team/app:pull"),
        ]
    )
    answer = http_request("GET", f"{token_server.realm}?{query}")
    assert answer.status == 200
    token = json.loads(answer.body)["token"]
    claims = token_server.decode(token, audience=token_registry.token_service or "")
    assert claims["sub"] == ""
    assert claims["access"] == [{"type": "repository", "name": "public/app", "actions": ["pull"]}]
    last = token_server.recorded()[-1]
    assert last.method == "GET"
    assert last.query_values("scope") == [
        "repository:public/app:pull,push",
        "repository:team/app:pull",
    ]
    assert last.header("Authorization") is None


def test_basic_registry_challenges_and_serves_alice(
    skopeo: Skopeo, basic_registry: Registry, basic_image: PushedImage
) -> None:
    answer = http_request("GET", f"{basic_registry.url}/v2/")
    assert answer.status == 401
    assert (answer.header("WWW-Authenticate") or "").startswith("Basic ")
    pulled = skopeo.pull_to_dir(basic_image.ref, creds=ALICE_CREDS)
    assert pulled.manifest_digest == basic_image.manifest_digest


def test_pull_through_registry_mirrors_token_upstream(
    skopeo: Skopeo,
    registry_factory: Callable[..., Registry],
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    mirror = registry_factory(
        "pull_through", remote_url=token_registry.url, username="alice", password="wonderland"
    )
    pulled = skopeo.pull_to_dir(f"{mirror.host}/{token_image.path}")
    assert pulled.manifest_digest == token_image.manifest_digest
    assert pulled.blob_digests == set(token_image.blob_digests)


def test_registry_restarts_on_same_port_with_its_content(
    skopeo: Skopeo, registry_factory: Callable[..., Registry], image: BuiltImage
) -> None:
    registry = registry_factory("plain")
    skopeo.push(image.source, f"{registry.host}/team/app:v1")
    port = registry.port
    registry.stop()
    assert http_status(f"{registry.url}/v2/", timeout=1) is None
    registry.start()
    assert registry.port == port
    pulled = skopeo.pull_to_dir(f"{registry.host}/team/app:v1")
    assert pulled.manifest_digest == image.manifest_digest


def test_skopeo_rejects_a_port_inside_the_repository_path(skopeo: Skopeo) -> None:
    """Why the path-prefix tests name a namespace without a port.

    ``127.0.0.1:PROXYD/127.0.0.1:5001/team/app`` is not a valid docker reference: a
    path component may not hold ``:``.  Clients can only use path-prefix routing for
    namespaces whose name has no port.
    """
    done = skopeo.run(
        "inspect",
        "--tls-verify=false",
        "docker://127.0.0.1:1/127.0.0.1:5001/team/app:v1",
        timeout=20,
        check=False,
    )
    assert done.returncode != 0
    assert "invalid reference format" in done.stderr


def test_containerd_pulls_with_hosts_dir(
    containerd: Containerd,
    plain_registry: Registry,
    plain_image: PushedImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(hosts_dir, plain_registry.host, server=plain_registry.url)
    containerd.images_pull(plain_image.ref, hosts_dir=hosts_dir, namespace=ctr_namespace)
    assert containerd.image_target(plain_image.ref, namespace=ctr_namespace) == (
        plain_image.manifest_digest
    )
    stored = containerd.content_digests(namespace=ctr_namespace)
    assert {plain_image.manifest_digest, *plain_image.blob_digests} <= stored


def test_containerd_sends_ns_to_a_mirror(
    containerd: Containerd,
    plain_registry: Registry,
    plain_image: PushedImage,
    registry_factory: Callable[..., Registry],
    skopeo: Skopeo,
    image: BuiltImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    mirror = registry_factory("plain")
    skopeo.push(image.source, f"{mirror.host}/{plain_image.path}")
    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(
        hosts_dir,
        plain_registry.host,
        server=plain_registry.url,
        mirrors=[(mirror.url, ("pull", "resolve"))],
    )
    before = len(mirror.requests())
    containerd.content_fetch(plain_image.ref, hosts_dir=hosts_dir, namespace=ctr_namespace)
    seen = mirror.requests()[before:]
    ns = "ns=" + urllib.parse.quote(plain_registry.host, safe="")
    assert seen, "containerd never asked the mirror"
    assert all(ns in r.uri for r in seen), [r.uri for r in seen]
    assert {r.method for r in seen} >= {"HEAD", "GET"}


def test_podman_pulls_through_a_registries_conf_mirror(
    podman: Podman,
    plain_registry: Registry,
    plain_image: PushedImage,
    registry_factory: Callable[..., Registry],
    skopeo: Skopeo,
    image: BuiltImage,
) -> None:
    mirror = registry_factory("plain")
    skopeo.push(image.source, f"{mirror.host}/{plain_image.path}")
    podman.set_registries_conf(registries_conf_with_mirror(plain_registry.host, mirror.host))
    before = len(mirror.blob_gets())
    podman.pull(plain_image.ref)
    assert podman.image_digest(plain_image.ref) == plain_image.manifest_digest
    fetched = {r.path.rpartition("/")[2] for r in mirror.blob_gets()[before:]}
    assert fetched == set(plain_image.blob_digests)


@pytest.mark.parametrize("mode", ["404", "500", "401"])
def test_faulty_mirror_answers_as_configured(mode: str) -> None:
    with FaultyMirror(mode) as mirror:  # type: ignore[arg-type]
        assert http_status(f"{mirror.url}/v2/") == 200
        answer = http_request(
            "GET",
            f"{mirror.url}/v2/team/app/manifests/v1",
            headers={"Authorization": "Basic " + base64.b64encode(b"x:y").decode()},
        )
        assert answer.status == int(mode)
        assert mirror.recorded()[-1].header("Authorization") is not None


def test_hanging_mirror_does_not_answer_and_stops_promptly() -> None:
    mirror = FaultyMirror("hang").start()
    try:
        assert http_status(f"{mirror.url}/v2/team/app/manifests/v1", timeout=0.5) is None
    finally:
        mirror.stop()


def test_containerd_cannot_pull_private_token_image_anonymously(
    containerd: Containerd,
    token_registry: Registry,
    token_image: PushedImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    """The premise of the containerd tests: without proxyd, anonymous containerd fails."""
    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(hosts_dir, token_registry.host, server=token_registry.url)
    with pytest.raises(PeerError, match=r"(?i)unauthorized|denied|401|403"):
        containerd.content_fetch(token_image.ref, hosts_dir=hosts_dir, namespace=ctr_namespace)


def test_podman_cannot_pull_private_token_image_anonymously(
    podman: Podman, token_registry: Registry, token_image: PushedImage
) -> None:
    """The premise of the podman tests: without proxyd, anonymous podman fails."""
    podman.set_registries_conf(
        f'unqualified-search-registries = []\n\n[[registry]]\nlocation = "{token_registry.host}"\n'
        "insecure = true\n"
    )
    with pytest.raises(PeerError, match=r"(?i)unauthorized|denied"):
        podman.pull(token_image.ref)


def test_containerd_with_user_gets_oauth2_token_by_post(
    containerd: Containerd,
    token_registry: Registry,
    token_server: TokenServer,
    token_image: PushedImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(hosts_dir, token_registry.host, server=token_registry.url)
    before = len(token_server.recorded())

    containerd.content_fetch(
        token_image.ref, hosts_dir=hosts_dir, user=ALICE_CREDS, namespace=ctr_namespace
    )

    posts = [r for r in token_server.recorded()[before:] if r.method == "POST"]
    assert posts, "containerd did not use the OAuth2 POST flow"
    assert posts[0].form_value("grant_type") == "password"
    assert posts[0].form_value("username") == "alice"
    assert posts[0].form_value("service") == token_registry.token_service


def test_require_binary_skips_or_fails_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "proxyd-test-no-such-binary"
    monkeypatch.delenv(REQUIRE_PEERS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_binary(missing)
    monkeypatch.setenv(REQUIRE_PEERS_ENV, "1")
    with pytest.raises(pytest.fail.Exception):
        require_binary(missing)
    assert require_binary("sh").endswith("/sh")
