"""GitHub's container registry (ghcr.io) as the zoo reproduces it: a token service on
the registry's own host that hands anonymous tokens out for public images, and blobs
handed out from another host.

Each behaviour, and where it comes from. GitHub's docs say public images can be pulled
anonymously (github.blog, 2020-09-01, "Introducing GitHub Container Registry"); the
protocol itself is documented by others only:

- The challenge: `Bearer realm="https://ghcr.io/token",service="ghcr.io",
  scope="repository:user/image:pull"`, as curl shows it (iz6.ru, "How to get an API
  token for GitHub Container Registry"). For a repository the scope is its own; for
  `/v2/` the `user/image` placeholder (toddysm.com, 2024-02-12, "Authenticating with OCI
  Registries - GitHub Container Registry (GHCR) Implementation", its 2024-03-04 update).
  The realm is on the registry's host.
- Anonymous tokens: `GET https://ghcr.io/token?scope=repository:OWNER/IMAGE:pull` without
  credentials gives a token for a public image (richlander/container-registry-api,
  ghcr.md: "You can access public images with a no-op token. However, you still need to
  ask for it, at repo scope"; the iz6.ru question adds `service=ghcr.io`). The answer
  holds `token` and no `expires_in` (toddysm.com: "it does not reply with the expiration
  of the token"). How long ghcr honours a token was not found: the zoo's never expire.
- A token without access to the image is refused 403 `DENIED`, "denied" (what docker
  prints for it: "denied: denied", github.com/orgs/community/discussions/50487).
- Blob GETs (and HEADs) are answered 307 to another host: containerd/stargz-snapshotter#167
  shows the 307 (then to an S3 bucket); today's target is
  pkg-containers.githubusercontent.com/ghcr1/blobs/sha256:<hex> with an Azure SAS query
  (Homebrew's download logs, e.g. `?se=2023-10-19T23%3A35%3A00Z&sig=…&sp=r&spr=https&sr=b
  &sv=2019-12-12`; trivy's docs list that host for allowlists). Reading SAS (`sp=r`)
  allows GET and HEAD alike (tests/zoo/storage.py).
"""

from __future__ import annotations

from aiohttp import web

from tests.zoo.registry import Asked, Registry, bearer_token, oci_error
from tests.zoo.storage import SignedStorage
from tests.zoo.tokens import TokenService

SERVICE = "ghcr.io"


class GhcrTokens(TokenService):
    """ghcr.io/token: anonymous pulls of public images, tokens with no stated lifetime."""

    def __init__(self) -> None:
        super().__init__(service=SERVICE, expires_in=None)
        self.public: set[str] = set()

    def policy(self, subject: str | None, repository: str, actions: set[str]) -> set[str]:
        return {"pull"} & actions if repository in self.public else set()


class Ghcr(Registry):
    """ghcr.io: the registry and `tokens` on one server; `storage` (its blob host) on
    another."""

    def __init__(self) -> None:
        self.tokens = GhcrTokens()
        super().__init__(storage=SignedStorage("azure"))

    @property
    def origin(self) -> str:
        return self.tokens.origin

    @origin.setter
    def origin(self, value: str) -> None:
        self.tokens.origin = value  # the realm is on the registry's own host

    def publish(self, repository: str) -> None:
        self.tokens.public.add(repository)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", self.tokens.path, self.tokens._handle)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def refuse(self, request: web.Request, asked: Asked) -> web.StreamResponse | None:
        token = bearer_token(request)
        grant = self.tokens.grant(token) if token else None
        if grant is None:
            scope = asked.repository or "user/image"
            challenge = (
                f'Bearer realm="{self.tokens.realm}",service="{SERVICE}",'
                f'scope="repository:{scope}:pull"'
            )
            return oci_error(
                401,
                "UNAUTHORIZED",
                "authentication required",
                headers={"WWW-Authenticate": challenge},
            )
        if asked.repository and not grant.allows(asked.repository, "pull"):
            return oci_error(403, "DENIED", "denied")
        return None
