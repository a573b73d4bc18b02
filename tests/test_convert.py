"""Legacy image configs (`application/octet-stream`) served as Docker schema2 configs,
per namespace, as containerd's ConvertManifest does."""

from __future__ import annotations

import hashlib
import json

from aiohttp import web

from proxyd.convert import SCHEMA2_CONFIG_MEDIA_TYPE, convert_legacy_config
from tests.conftest import host, origin

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
LEGACY = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": SCHEMA2,
        "config": {
            "mediaType": "application/octet-stream",
            "digest": "sha256:" + "1" * 64,
            "size": 2,
        },
        "layers": [],
    }
).encode()
LEGACY_DIGEST = "sha256:" + hashlib.sha256(LEGACY).hexdigest()


def test_a_legacy_config_media_type_is_rewritten():
    converted = convert_legacy_config(LEGACY, SCHEMA2)
    assert converted is not None
    manifest = json.loads(converted)
    assert manifest["config"]["mediaType"] == SCHEMA2_CONFIG_MEDIA_TYPE
    assert manifest["config"]["digest"] == "sha256:" + "1" * 64
    assert manifest["mediaType"] == SCHEMA2


def test_lists_modern_configs_and_garbage_are_left_alone():
    index = json.dumps({"manifests": [], "config": {"mediaType": "application/octet-stream"}})
    assert convert_legacy_config(index.encode(), "application/vnd.oci.image.index.v1+json") is None
    modern = LEGACY.replace(b"application/octet-stream", SCHEMA2_CONFIG_MEDIA_TYPE.encode())
    assert convert_legacy_config(modern, SCHEMA2) is None
    assert convert_legacy_config(b"not json", SCHEMA2) is None


async def legacy_registry(aiohttp_server):
    async def answer(request: web.Request) -> web.Response:
        if request.path in ("/v2/old/app/manifests/v1", f"/v2/old/app/manifests/{LEGACY_DIGEST}"):
            return web.Response(
                body=LEGACY if request.method == "GET" else None,
                content_type=SCHEMA2,
                headers={"Docker-Content-Digest": LEGACY_DIGEST},
            )
        return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return await aiohttp_server(app, host="127.0.0.1")


def config(server: object, convert: bool) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
            f"convert_legacy_config = {str(convert).lower()}",
        ]
    )


async def test_opted_in_the_tag_resolves_to_the_converted_manifest(make_proxyd, aiohttp_server):
    server = await legacy_registry(aiohttp_server)
    proxyd = await make_proxyd(config(server, convert=True))
    by_tag = await proxyd.get("/v2/old/app/manifests/v1")
    body = await by_tag.read()
    converted_digest = by_tag.headers["Docker-Content-Digest"]
    assert converted_digest == "sha256:" + hashlib.sha256(body).hexdigest()
    assert converted_digest != LEGACY_DIGEST
    assert json.loads(body)["config"]["mediaType"] == SCHEMA2_CONFIG_MEDIA_TYPE

    head = await proxyd.head("/v2/old/app/manifests/v1")
    assert head.headers["Docker-Content-Digest"] == converted_digest
    again = await proxyd.get(f"/v2/old/app/manifests/{converted_digest}")
    assert (again.status, await again.read()) == (200, body)
    original = await proxyd.get(f"/v2/old/app/manifests/{LEGACY_DIGEST}")
    assert await original.read() == LEGACY


async def test_not_opted_in_the_manifest_is_untouched(make_proxyd, aiohttp_server):
    server = await legacy_registry(aiohttp_server)
    proxyd = await make_proxyd(config(server, convert=False))
    by_tag = await proxyd.get("/v2/old/app/manifests/v1")
    assert by_tag.headers["Docker-Content-Digest"] == LEGACY_DIGEST
    assert await by_tag.read() == LEGACY
