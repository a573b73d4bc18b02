"""skopeo, an anonymous client, pulls through proxyd; proxyd holds the credentials."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest

from tests.e2e.helpers import (
    PATH_PREFIX_NAMESPACE,
    StartProxyd,
    assert_same_image,
    blob_gets,
    digest_of,
    upstream_config,
    wait_until_stored,
)
from tests.peers.clients import Skopeo
from tests.peers.image import OCI_MANIFEST, BuiltImage, PushedImage
from tests.peers.proxyd import Namespace
from tests.peers.registry import Registry
from tests.peers.tokenserver import TokenServer

pytestmark = pytest.mark.peers


def test_anonymous_skopeo_pulls_token_auth_image_via_default_namespace(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_server: TokenServer,
    token_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry))
    tokens_before = len(token_server.issued())

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")

    assert_same_image(pulled, token_image)
    issued = token_server.issued()[tokens_before:]
    assert any(t.subject == "alice" for t in issued), (
        f"proxyd never obtained a token as alice: {[(t.subject, t.via, t.access) for t in issued]}"
    )


def test_second_pull_is_served_from_proxyd_cache(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry))
    ref = f"{proxyd.host}/{token_image.path}"
    skopeo.pull_to_dir(ref)
    first = proxyd.wait_for_log(lambda log: len(blob_gets(log)) >= len(token_image.blob_digests))
    assert {e.get("cache") for e in blob_gets(first)} == {"miss"}, proxyd.describe_log()
    for digest in token_image.blob_digests:  # stored just after its last byte went out
        wait_until_stored(proxyd.cache_dir, digest)
    upstream_blob_gets = len(token_registry.blob_gets(status=None))

    pulled = skopeo.pull_to_dir(ref)

    assert_same_image(pulled, token_image)
    expected = 2 * len(token_image.blob_digests)
    second = blob_gets(proxyd.wait_for_log(lambda log: len(blob_gets(log)) >= expected))
    second = second[len(blob_gets(first)) :]
    assert sorted(digest_of(e["path"]) for e in second) == sorted(token_image.blob_digests)
    assert {e.get("cache") for e in second} == {"hit"}, proxyd.describe_log()
    assert len(token_registry.blob_gets(status=None)) == upstream_blob_gets, (
        "the registry served blobs again on the second pull"
    )
    layer = token_image.image.layer_digests[0]
    answer = proxyd.request("GET", f"/v2/{token_image.repository}/blobs/{layer}")
    assert answer.status == 200
    assert answer.header("X-Proxyd-Cache") == "hit"
    assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == layer


def test_skopeo_pulls_via_path_prefix_namespace(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    plain_registry: Registry,
    routing_decoy: PushedImage,
) -> None:
    """``/v2/registry.test/team/app/…`` goes to the namespace ``registry.test``.

    The default namespace is another registry that holds a different image under
    ``registry.test/team/app``: a request routed by default would get that one.
    """
    proxyd = start_proxyd(
        upstream_config(
            token_registry,
            namespace=PATH_PREFIX_NAMESPACE,
            default_namespace=plain_registry.host,
            extra_namespaces=[Namespace(plain_registry.host, plain_registry.url)],
        )
    )

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{PATH_PREFIX_NAMESPACE}/{token_image.path}")

    assert pulled.manifest_digest != routing_decoy.manifest_digest, "routed to the default"
    assert_same_image(pulled, token_image)
    routed = proxyd.wait_for_log(lambda log: bool(blob_gets(log)))
    assert {e.get("namespace") for e in blob_gets(routed)} == {PATH_PREFIX_NAMESPACE}


def test_host_and_port_path_prefix_routes_plain_http_requests(
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    plain_registry: Registry,
) -> None:
    """``/v2/127.0.0.1:PORT/team/app/…``, the form in proxyd's docs.

    No docker client can send it (a ``:`` in a path component is not a valid
    reference, see test_harness), so it is exercised with plain HTTP requests.
    """
    proxyd = start_proxyd(
        upstream_config(
            token_registry,
            default_namespace=plain_registry.host,
            extra_namespaces=[Namespace(plain_registry.host, plain_registry.url)],
        )
    )
    prefix = f"/v2/{token_registry.host}/{token_image.repository}"

    manifest = proxyd.request("GET", f"{prefix}/manifests/v1", headers={"Accept": OCI_MANIFEST})

    assert manifest.status == 200, manifest.body[:500]
    assert "sha256:" + hashlib.sha256(manifest.body).hexdigest() == token_image.manifest_digest
    assert manifest.header("Docker-Content-Digest") == token_image.manifest_digest
    for digest in token_image.blob_digests:
        blob = proxyd.request("GET", f"{prefix}/blobs/{digest}")
        assert blob.status == 200, (digest, blob.body[:500])
        assert "sha256:" + hashlib.sha256(blob.body).hexdigest() == digest


def test_anonymous_skopeo_pulls_basic_auth_image(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    basic_registry: Registry,
    basic_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(basic_registry))
    served_before = len(basic_registry.blob_gets())

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{basic_image.path}")

    assert_same_image(pulled, basic_image)
    served = {r.path.rpartition("/")[2] for r in basic_registry.blob_gets()[served_before:]}
    assert served == set(basic_image.blob_digests), "the registry did not serve proxyd the blobs"


def test_docker_schema2_manifest_passes_through_unchanged(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_docker_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry))

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{token_docker_image.path}")

    assert_same_image(pulled, token_docker_image)
    assert pulled.manifest_json["mediaType"] == token_docker_image.image.manifest_media_type


def test_skopeo_lists_tags_through_proxyd(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry))

    done = skopeo.run(
        "list-tags",
        "--tls-verify=false",
        "--no-creds",
        f"docker://{proxyd.host}/{token_image.repository}",
        timeout=60,
    )

    listed = json.loads(done.stdout)
    assert token_image.tag in listed["Tags"]


def test_cached_image_is_served_by_digest_while_upstream_is_down(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    registry_factory: Callable[..., Registry],
    image: BuiltImage,
) -> None:
    registry = registry_factory("htpasswd")
    skopeo.push(image.source, f"{registry.host}/team/app:v1", creds="alice:wonderland")
    proxyd = start_proxyd(upstream_config(registry))
    skopeo.pull_to_dir(f"{proxyd.host}/team/app:v1")

    registry.stop()
    pulled = skopeo.pull_to_dir(f"{proxyd.host}/team/app@{image.manifest_digest}")

    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.blob_digests == set(image.blob_digests)


def test_access_log_has_one_event_per_request_with_body_bytes(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    """One ``event="request"`` per request; ``bytes`` is the body sent (as ``%b``)."""
    proxyd = start_proxyd(upstream_config(token_registry))

    skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")

    image = token_image.image
    log = proxyd.wait_for_log(lambda entries: len(blob_gets(entries)) >= len(image.blob_digests))
    keys = {"method", "path", "namespace", "host", "status", "bytes", "duration_ms", "cache"}
    for entry in log:
        assert keys <= entry.keys(), f"missing {keys - entry.keys()} in {entry}"
    manifest = [e for e in log if e["method"] == "GET" and e["path"].endswith("/manifests/v1")]
    assert [e["bytes"] for e in manifest] == [len(image.manifest)], manifest
    sent = {digest_of(e["path"]): e["bytes"] for e in blob_gets(log)}
    assert sent == {d: len(image.blob(d)) for d in image.blob_digests}
