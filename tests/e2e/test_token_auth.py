"""proxyd's authorizer against distribution in `auth.token` mode and its token server
(tests/peers: registry.py, tokenserver.py), proxyd running in this process.

The token server parses scopes as distribution's token spec says
(docs/spec/auth/token.md: a GET repeats `scope`, one scope each; oauth.md: a POST
sends one `scope` holding a space-separated list), and grants anonymous clients pull
on `public/*` only, so a token asked for wrongly grants nothing and shows as a 401.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.helpers import ALICE_CREDS
from tests.peers.clients import Skopeo
from tests.peers.image import OCI_MANIFEST, BuiltImage, PushedImage, push_image
from tests.peers.registry import Registry
from tests.peers.tokenserver import SigningKey, TokenServer

pytestmark = pytest.mark.peers

REPOSITORIES = ("public/one", "public/two")
ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture(scope="module")
def tokens() -> Iterator[TokenServer]:
    with TokenServer(public_repos=["public/*"]) as server:
        yield server


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tokens: TokenServer) -> Iterator[Registry]:
    with Registry.token(tmp_path_factory.mktemp("token-auth"), tokens) as server:
        yield server


@pytest.fixture(scope="module")
def images(skopeo: Skopeo, image: BuiltImage, registry: Registry) -> dict[str, PushedImage]:
    return {
        repository: push_image(skopeo, image, registry.host, repository, creds=ALICE_CREDS)
        for repository in REPOSITORIES
    }


def config(registry: Registry, *, alice: bool) -> str:
    lines = [
        f'default_namespace = "{registry.host}"',
        f'[namespaces."{registry.host}"]',
        f'server = "{registry.url}"',
    ]
    if alice:
        lines += [
            f'[credentials."{registry.host}"]',
            'username = "alice"',
            'password = "wonderland"',
        ]
    return "\n".join(lines)


def rotate_signing_key(tokens: TokenServer, registry: Registry) -> None:
    """The token issuer's key is replaced and the registry restarted trusting only the
    new one (where `Registry.token` wrote its rootcertbundle): every token issued before
    is now answered 401 `error="invalid_token"` (distribution's token.Verify)."""
    tokens.signing_key = SigningKey.generate()
    tokens.write_rootcertbundle(registry.workdir / "token-signer.pem")
    registry.stop()
    registry.start()


async def pull_both_twice(proxyd, images: dict[str, PushedImage]) -> None:
    """Each repository's manifest, then its blobs, in turns: every blob request goes
    upstream (a GET, or a HEAD confirming the repository holds a blob proxyd already
    stored), so each is a chance to use a cached token."""
    for repository, pushed in images.items():
        response = await proxyd.get(f"/v2/{repository}/manifests/{pushed.tag}", headers=ACCEPT)
        assert response.status == 200, await response.text()
    for turn in range(2):
        for repository, pushed in images.items():
            digest = pushed.blob_digests[turn]
            response = await proxyd.get(f"/v2/{repository}/blobs/{digest}")
            assert response.status == 200, await response.text()
            await response.read()


@pytest.mark.parametrize(
    ("alice", "method"), [(False, "GET"), (True, "POST")], ids=["anonymous", "alice"]
)
async def test_one_token_per_repository_scope_then_cached(
    make_proxyd, tokens: TokenServer, registry: Registry, images, alice: bool, method: str
) -> None:
    proxyd = await make_proxyd(config(registry, alice=alice))
    tokens.clear()
    registry.log_barrier()
    before = len(registry.refusals())

    await pull_both_twice(proxyd, images)

    asked = tokens.recorded()
    assert [r.method for r in asked] == [method, method], "one token fetch per repository"
    if method == "GET":
        scopes = [r.query_values("scope") for r in asked]
    else:
        scopes = [[r.form_value("scope")] for r in asked]
    assert scopes == [[f"repository:{repository}:pull"] for repository in REPOSITORIES]
    granted = [issued.access for issued in tokens.issued()]
    assert granted == [
        ({"type": "repository", "name": repository, "actions": ["pull"]},)
        for repository in REPOSITORIES
    ]
    registry.log_barrier()
    refused = [uri for uri in registry.refusals()[before:] if "log-barrier" not in uri]
    assert len(refused) == 1, f"only the first request, before proxyd knew the challenge: {refused}"


async def test_a_token_the_registry_no_longer_accepts_is_fetched_again(
    make_proxyd, tokens: TokenServer, registry: Registry, images
) -> None:
    pushed = images["public/one"]
    proxyd = await make_proxyd(config(registry, alice=False))
    manifest = await proxyd.get(f"/v2/public/one/manifests/{pushed.tag}", headers=ACCEPT)
    assert manifest.status == 200, await manifest.text()
    rotate_signing_key(tokens, registry)
    tokens.clear()

    response = await proxyd.get(f"/v2/public/one/blobs/{pushed.blob_digests[0]}")

    assert response.status == 200, await response.text()
    assert len(tokens.recorded()) == 1, "the refused token was dropped and one fetched anew"
