"""After a write through proxyd, what the small-response cache holds about the
repository is asked of upstream again: a push or delete of a tag, or of a manifest by
digest, makes the next tag list (and any cached tag) come from upstream, and a
referrer pushed or deleted makes the next referrers of its subject do so, on every
replica sharing the cache, though `tag_ttl` (60 s here) has not passed."""

from __future__ import annotations

import json
from typing import Any

from tests.fakes import digest_of, make_image
from tests.test_push import OCI_MANIFEST, UploadRegistry, push_config, push_image, serve, start

EMPTY = b"{}"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def writable(server: object) -> str:
    return push_config(server, "allow_delete = true")


async def tag_list(proxyd: Any) -> tuple[list[str], str]:
    response = await proxyd.get("/v2/team/app/tags/list")
    assert response.status == 200
    return (await response.json())["tags"], response.headers["X-Proxyd-Cache"]


async def referrers(proxyd: Any, subject: str) -> tuple[list[str], str]:
    response = await proxyd.get(f"/v2/team/app/referrers/{subject}")
    assert response.status == 200
    found = [m["digest"] for m in (await response.json())["manifests"]]
    return found, response.headers["X-Proxyd-Cache"]


async def test_a_tag_pushed_or_deleted_through_proxyd_makes_the_next_tag_list_come_from_upstream(
    make_proxyd, start_fake
):
    upstream = UploadRegistry()
    proxyd = await make_proxyd(writable(await serve(start_fake, upstream)))
    assert (await push_image(proxyd, make_image(tag="v1"))).status == 201
    assert await tag_list(proxyd) == (["v1"], "miss")
    assert await tag_list(proxyd) == (["v1"], "hit")

    assert (await push_image(proxyd, make_image(tag="v2", layer=b"two" * 100))).status == 201
    assert await tag_list(proxyd) == (["v1", "v2"], "miss")
    assert (await proxyd.delete("/v2/team/app/manifests/v1")).status == 202
    assert await tag_list(proxyd) == (["v2"], "miss")
    assert await tag_list(proxyd) == (["v2"], "hit")


async def test_a_manifest_deleted_by_digest_makes_its_tags_and_the_tag_list_come_from_upstream(
    make_proxyd, start_fake
):
    upstream = UploadRegistry()
    proxyd = await make_proxyd(writable(await serve(start_fake, upstream)))
    image = make_image(tag="v1")
    assert (await push_image(proxyd, image)).status == 201
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert await tag_list(proxyd) == (["v1"], "miss")

    assert (await proxyd.delete(f"/v2/team/app/manifests/{image.digest}")).status == 202
    assert await tag_list(proxyd) == ([], "miss")
    gone = await proxyd.get("/v2/team/app/manifests/v1")
    assert gone.status == 404  # the tag went with its manifest, upstream


async def test_a_referrer_pushed_or_deleted_through_proxyd_makes_its_subjects_referrers_fresh(
    make_proxyd, start_fake
):
    upstream = UploadRegistry()
    proxyd = await make_proxyd(writable(await serve(start_fake, upstream)))
    image = make_image(tag="v1")
    assert (await push_image(proxyd, image)).status == 201
    assert await referrers(proxyd, image.digest) == ([], "miss")
    assert await referrers(proxyd, image.digest) == ([], "hit")

    signature = await push_referrer(proxyd, image.digest, len(image.manifest))
    assert await referrers(proxyd, image.digest) == ([signature], "miss")
    assert (await proxyd.delete(f"/v2/team/app/manifests/{signature}")).status == 202
    assert await referrers(proxyd, image.digest) == ([], "miss")


async def test_a_write_through_one_replica_is_seen_by_another_sharing_the_cache(
    make_proxyd, start_fake
):
    upstream = UploadRegistry()
    server = await serve(start_fake, upstream)
    pushing, reading = await make_proxyd(writable(server)), await make_proxyd(writable(server))
    assert (await push_image(pushing, make_image(tag="v1"))).status == 201
    assert await tag_list(reading) == (["v1"], "miss")
    assert await tag_list(reading) == (["v1"], "hit")
    assert (await push_image(pushing, make_image(tag="v2", layer=b"two" * 100))).status == 201
    assert await tag_list(reading) == (["v1", "v2"], "miss")


async def push_referrer(proxyd: Any, subject: str, size: int) -> str:
    started = await start(proxyd)
    done = await proxyd.put(
        started.headers["Location"], params={"digest": digest_of(EMPTY)}, data=EMPTY
    )
    assert done.status == 201
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": {"mediaType": EMPTY_CONFIG, "digest": digest_of(EMPTY), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": size},
        }
    ).encode()
    digest = digest_of(manifest)
    pushed = await proxyd.put(
        f"/v2/team/app/manifests/{digest}",
        data=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert pushed.status == 201
    return digest
