"""Pushes through proxyd to the real distribution: skopeo as the client, raw HTTP for
the parts of the upload protocol skopeo never uses (several PATCHes, status, resume,
cancel, mounts), and inbound users from an htpasswd file."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import re
import secrets
import time
from pathlib import Path

import bcrypt
import pytest

from tests.e2e.helpers import (
    ALICE,
    ALICE_CREDS,
    StartProxyd,
    assert_same_image,
    blob_gets,
    digest_of,
    upstream_config,
)
from tests.peers import HttpResult, http_request
from tests.peers.clients import Skopeo
from tests.peers.image import BuiltImage, PushedImage
from tests.peers.proxyd import ProxydProcess
from tests.peers.registry import Registry
from tests.peers.tokenserver import TokenServer

pytestmark = pytest.mark.peers

BLOB = random.Random(4).randbytes(300 * 1024)
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def pushing_proxyd(
    start_proxyd: StartProxyd, registry: Registry, **settings: object
) -> ProxydProcess:
    """proxyd in front of ``registry`` with alice's credentials, pushes allowed."""
    return start_proxyd(
        upstream_config(registry, settings={"allow_push": [registry.host], **settings})
    )


def call(
    proxyd: ProxydProcess,
    method: str,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResult:
    return http_request(method, f"{proxyd.url}{path}", data=data, headers=headers, timeout=30)


def error_code(result: HttpResult) -> str:
    return str(json.loads(result.body)["errors"][0]["code"])


def log_barrier(registry: Registry, timeout: float = 5.0) -> None:
    """``Registry.log_barrier`` for a registry with token auth, which logs a 401 with
    no `response completed` line: here the marker request carries alice's token."""
    challenge = http_request("GET", f"{registry.url}/v2/").header("WWW-Authenticate") or ""
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    alice = base64.b64encode(ALICE_CREDS.encode()).decode()
    answer = http_request(
        "GET",
        f"{params['realm']}?service={params['service']}",
        headers={"Authorization": f"Basic {alice}"},
    )
    bearer = {"Authorization": f"Bearer {json.loads(answer.body)['token']}"}
    marker = f"/v2/?log-barrier={secrets.token_hex(6)}"
    http_request("GET", f"{registry.url}{marker}", headers=bearer)
    deadline = time.monotonic() + timeout
    while not any(r.uri == marker for r in registry.requests()):
        assert time.monotonic() < deadline, f"docker-registry did not log {marker}"
        time.sleep(0.02)


def registry_calls(registry: Registry, repository: str) -> list[tuple[str, str, int]]:
    """(method, path, status) of what the registry served under ``repository``."""
    log_barrier(registry)
    return [
        (r.method, r.path, r.status)
        for r in registry.requests()
        if r.path.startswith(f"/v2/{repository}/")
    ]


# -- (1) skopeo pushes an image through proxyd ------------------------------------------------


def test_skopeo_pushes_through_proxyd_and_pulls_back_from_its_store(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_server: TokenServer,
    image: BuiltImage,
) -> None:
    proxyd = start_proxyd(
        upstream_config(token_registry), extra_args=["--allow-push", token_registry.host]
    )
    pushed = PushedImage(image, token_registry.host, "pushed/skopeo", "v1")
    tokens_before = len(token_server.issued())

    # skopeo is anonymous: proxyd holds alice's credentials for the registry.
    skopeo.copy(image.source, f"docker://{proxyd.host}/{pushed.path}", extra=["--preserve-digests"])

    granted = token_server.issued()[tokens_before:]
    assert any(
        t.subject == "alice"
        and any(a["name"] == pushed.repository and "push" in a["actions"] for a in t.access)
        for t in granted
    ), [(t.subject, t.access) for t in granted]
    straight = skopeo.pull_to_dir(pushed.ref, creds=ALICE_CREDS)
    assert_same_image(straight, pushed)

    log_barrier(token_registry)
    registry_blob_gets = len(token_registry.blob_gets(status=None))
    back = skopeo.pull_to_dir(f"{proxyd.host}/{pushed.path}")
    assert_same_image(back, pushed)
    served = blob_gets(
        proxyd.wait_for_log(lambda log: len(blob_gets(log)) >= len(pushed.blob_digests))
    )
    assert sorted(digest_of(e["path"]) for e in served) == sorted(pushed.blob_digests)
    kept = [
        (e["event"], e.get("digest"), e.get("stored"))
        for e in proxyd.logs()
        if str(e.get("event")).startswith("blob.")
    ]
    # skopeo mounts a blob instead of uploading it where its blob-info cache (one per
    # machine for root: /var/lib/containers/cache) says this registry name holds it
    # already, which happens when an earlier test's proxyd had the same port. Those
    # bytes never pass proxyd; every blob that did is served from its store.
    mounted = {e.get("digest") for e in proxyd.logs() if e.get("event") == "blob.mounted"}
    uploaded = set(pushed.blob_digests) - mounted
    hits = {digest_of(e["path"]) for e in served if e.get("cache") == "hit"}
    assert uploaded <= hits, kept
    log_barrier(token_registry)
    assert len(token_registry.blob_gets(status=None)) == registry_blob_gets + len(
        set(pushed.blob_digests) - hits
    ), "the registry served blobs that proxyd stored as they were pushed"


# -- (2) the upload protocol by hand, against distribution ------------------------------------


def test_chunked_upload_status_resume_and_monolithic_uploads(
    start_proxyd: StartProxyd, token_registry: Registry
) -> None:
    proxyd = pushing_proxyd(start_proxyd, token_registry)
    repo = "raw/chunks"

    started = call(proxyd, "POST", f"/v2/{repo}/blobs/uploads/")
    assert started.status == 202, started.body
    location = started.header("Location") or ""
    uuid = started.header("Docker-Upload-UUID")
    assert location == f"/v2/{repo}/blobs/uploads/{uuid}"
    cuts = [0, 100_000, 200_000, len(BLOB)]
    for first, end in itertools.pairwise(cuts[:3]):
        chunk = call(
            proxyd,
            "PATCH",
            location,
            BLOB[first:end],
            {"Content-Range": f"{first}-{end - 1}", "Content-Type": "application/octet-stream"},
        )
        assert chunk.status == 202, chunk.body
        assert chunk.header("Range") == f"0-{end - 1}"
        assert chunk.header("Location") == location

    status = call(proxyd, "GET", location)  # a client resuming asks first
    assert status.status == 204
    assert status.header("Range") == f"0-{cuts[2] - 1}"
    assert status.header("Docker-Upload-UUID") == uuid
    resume_at = int((status.header("Range") or "").split("-")[1]) + 1
    rest = call(
        proxyd,
        "PATCH",
        location,
        BLOB[resume_at:],
        {"Content-Range": f"{resume_at}-{len(BLOB) - 1}"},
    )
    assert rest.status == 202, rest.body
    done = call(proxyd, "PUT", f"{location}?digest={BLOB_DIGEST}")
    assert done.status == 201, done.body
    assert done.header("Docker-Content-Digest") == BLOB_DIGEST

    monolithic = random.Random(5).randbytes(50_000)
    digest = "sha256:" + hashlib.sha256(monolithic).hexdigest()
    one_post = call(proxyd, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", monolithic)
    assert one_post.status == 201, one_post.body
    other = random.Random(6).randbytes(40_000)
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    post = call(proxyd, "POST", f"/v2/{repo}/blobs/uploads/")
    put = call(proxyd, "PUT", f"{post.header('Location')}?digest={other_digest}", other)
    assert put.status == 201, put.body

    calls = registry_calls(token_registry, repo)
    assert [status for method, _, status in calls if method == "PATCH"] == [202, 202, 202]
    assert [status for method, _, status in calls if method == "GET"] == [204]  # the status
    assert [status for method, _, status in calls if method == "PUT"] == [201, 201, 201]
    for blob, blob_digest in ((BLOB, BLOB_DIGEST), (monolithic, digest), (other, other_digest)):
        served = call(proxyd, "GET", f"/v2/{repo}/blobs/{blob_digest}")
        assert served.body == blob
        assert served.header("X-Proxyd-Cache") == "hit"
    log_barrier(token_registry)
    assert not [
        r for r in token_registry.blob_gets(status=None) if r.path.startswith(f"/v2/{repo}/")
    ]


def test_cancelled_upload_is_gone_here_and_at_the_registry(
    start_proxyd: StartProxyd, token_registry: Registry
) -> None:
    proxyd = pushing_proxyd(start_proxyd, token_registry)
    repo = "raw/cancelled"
    location = call(proxyd, "POST", f"/v2/{repo}/blobs/uploads/").header("Location") or ""
    assert call(proxyd, "PATCH", location, BLOB[:1000]).status == 202

    cancelled = call(proxyd, "DELETE", location)
    assert cancelled.status == 204
    after = call(proxyd, "GET", location)
    assert after.status == 404
    assert error_code(after) == "BLOB_UPLOAD_UNKNOWN"
    calls = registry_calls(token_registry, repo)
    assert [status for method, _, status in calls if method == "DELETE"] == [204]


def test_mounts_send_no_blob_bytes_twice(
    start_proxyd: StartProxyd, token_registry: Registry, token_image: PushedImage
) -> None:
    """A client's mount, and proxyd's own from its links (the distribution source):
    the registry answers the mount POST 201 and never sees the blob's bytes."""
    proxyd = pushing_proxyd(start_proxyd, token_registry)
    layer, other_layer = token_image.image.layer_digests[:2]

    asked = call(
        proxyd,
        "POST",
        f"/v2/raw/mounted/blobs/uploads/?mount={layer}&from={token_image.repository}",
    )
    assert asked.status == 201, asked.body
    assert asked.header("Location") == f"/v2/raw/mounted/blobs/{layer}"

    # proxyd learns where other_layer lives by pulling it; a client then pushes it
    # whole to another repository.
    pulled = call(proxyd, "GET", f"/v2/{token_image.repository}/blobs/{other_layer}")
    assert pulled.status == 200
    sourced = call(
        proxyd, "POST", f"/v2/raw/sourced/blobs/uploads/?digest={other_layer}", pulled.body
    )
    assert sourced.status == 201, sourced.body

    for repo, digest in (("raw/mounted", layer), ("raw/sourced", other_layer)):
        calls = registry_calls(token_registry, repo)
        mounts = [c for c in calls if c[0] == "POST"]
        assert mounts and all(status == 201 for _, _, status in mounts), calls
        assert not [c for c in calls if c[0] in ("PATCH", "PUT")], calls
        uris = [r.uri for r in token_registry.requests() if r.path.startswith(f"/v2/{repo}/")]
        assert f"mount={digest}" in uris[0] and f"from={token_image.repository}" in uris[0]
        head = call(proxyd, "HEAD", f"/v2/{repo}/blobs/{digest}")
        assert head.status == 200


# -- (4) inbound users ----------------------------------------------------------------------


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """As ``htpasswd -B`` writes it: bcrypt, ``$2y$``."""
    lines = [
        f"{user}:$2y$" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()[4:]
        for user, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def carols_proxyd(
    start_proxyd: StartProxyd, registry: Registry, image: BuiltImage, tmp_path: Path, name: str
) -> tuple[ProxydProcess, Path, PushedImage]:
    """proxyd taking pushes to `registry` from its one user, carol; the image's place."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"carol": "proxyd-secret"})
    proxyd = pushing_proxyd(start_proxyd, registry, htpasswd=str(htpasswd))
    return proxyd, htpasswd, PushedImage(image, registry.host, f"pushed/{name}", "v1")


def test_pushes_need_proxyds_own_users_pulls_do_not(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    proxyd, _, pushed = carols_proxyd(start_proxyd, token_registry, image, tmp_path, "inbound")
    dest = f"docker://{proxyd.host}/{pushed.path}"

    for creds in (None, "carol:wrong", f"{ALICE[0]}:{ALICE[1]}"):
        refused = skopeo.copy(
            image.source, dest, dest_creds=creds, extra=["--preserve-digests"], check=False
        )
        assert refused.returncode != 0, creds
        assert "401" in refused.stderr or "unauthorized" in refused.stderr.lower(), refused.stderr
    log_barrier(token_registry)
    writes = [c for c in registry_calls(token_registry, pushed.repository) if c[0] != "HEAD"]
    assert writes == []  # skopeo may ask whether blobs exist (a pull), nothing more

    skopeo.copy(image.source, dest, dest_creds="carol:proxyd-secret", extra=["--preserve-digests"])
    assert_same_image(skopeo.pull_to_dir(pushed.ref, creds=ALICE_CREDS), pushed)
    # An anonymous pull through proxyd still works: only pushes need a user.
    assert_same_image(skopeo.pull_to_dir(f"{proxyd.host}/{pushed.path}"), pushed)
    text = proxyd.stderr_text()
    assert "proxyd-secret" not in text
    manifests = [e for e in proxyd.logs() if e.get("event") == "manifest.pushed"]
    assert [e.get("user") for e in manifests] == ["carol"]


def test_a_user_added_to_htpasswd_can_push_after_sighup(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    proxyd, htpasswd, pushed = carols_proxyd(
        start_proxyd, token_registry, image, tmp_path, "reloaded"
    )
    dest = f"docker://{proxyd.host}/{pushed.path}"

    def push_as(creds: str) -> int:
        done = skopeo.copy(
            image.source, dest, dest_creds=creds, extra=["--preserve-digests"], check=False
        )
        return done.returncode

    assert push_as("dave:new-here") != 0
    write_htpasswd(htpasswd, {"carol": "proxyd-secret", "dave": "new-here"})
    proxyd.reload()
    assert [e.get("users") for e in proxyd.wait_for_event("config.reloaded")] == [2]

    assert push_as("dave:new-here") == 0
    assert_same_image(skopeo.pull_to_dir(pushed.ref, creds=ALICE_CREDS), pushed)
