"""Docker Hub as the zoo reproduces it: the registry (registry-1.docker.io), its token
service on another host (auth.docker.io's shape, on a port of its own), its pull rate
limit, and blobs handed out from storage on a third host.

Each behaviour, and where it comes from:

- The challenge names a realm on another host: `Bearer realm="https://auth.docker.io/token",
  service="registry.docker.io",scope="repository:samalba/my-app:pull,push"`
  (distribution's docs/content/spec/auth/token.md, the example Docker's own
  docs.docker.com/reference/api/registry/auth/ repeats); `GET /v2/` is challenged without
  a `scope` (the exchange shown at kube-demo.chrisstradtman.com, "Docker registry API
  authentication workflow example"), with the body `{"errors":[{"code":"UNAUTHORIZED",
  "message":"authentication required"}]}` of that page.
- Anonymous tokens, one per repository scope: `GET https://auth.docker.io/token?service=
  registry.docker.io&scope=repository:ratelimitpreview/test:pull` without credentials
  (docs.docker.com/docker-hub/usage/pulls/, "View pull rate and limit"), answered
  `{"token", "access_token", "expires_in": 300, "issued_at"}` (the kube-demo page). A
  public repository's pull is granted to anyone; nothing else is modelled.
- A token the registry does not accept is challenged again with `error="invalid_token"`,
  one lacking the access with `error="insufficient_scope"`: distribution's
  registry/auth/token/accesscontroller.go (`challengeParams`), Hub's own wording of these
  was not found.
- The pull limit (docs.docker.com/docker-hub/usage/pulls/, from docker/docs
  content/manuals/docker-hub/usage/pulls.md): manifest answers carry
  `ratelimit-limit: 100;w=21600`, `ratelimit-remaining: N;w=21600` and
  `docker-ratelimit-source`, "returned on both GET and HEAD requests. Using GET emulates a
  real pull and counts towards the limit. Using HEAD won't"; over the limit, "Docker Hub
  returns a 429 response code ... when the manifest is requested", with "You have reached
  your pull rate limit. You may increase the limit by authenticating and upgrading:
  https://www.docker.com/increase-rate-limits". Each manifest GET counts one pull (the
  earlier page, docker/docs content/docker-hub/download-rate-limit.md: "A pull request is
  defined as up to two GET requests on registry manifest URLs (/v2/*/manifests/*) ...
  HEAD requests aren't counted"); blobs count nothing. The 429's body is an OCI error with
  code `TOOMANYREQUESTS` (clients print "toomanyrequests: You have reached your pull rate
  limit", e.g. ScribeMD/docker-cache#829's log of a manifest GET). No `Retry-After`: none
  is documented for the pull limit (Hub's separate abuse limit answers `Retry-After: 60`,
  docker/hub-feedback#1907; not modelled). Multi-architecture images, counted once per
  architecture, are not modelled either.
- Blob GETs are answered 307 to a signed URL on a storage host that refuses the
  registry's `Authorization`: Hub's blob hosts are production.cloudflare.docker.com and
  docker-images-prod.<id>.r2.cloudflarestorage.com (docs.docker.com/desktop/setup/allow-list/);
  the 307 itself is distribution's (registry/storage/blobserver.go); the URL's shape is
  S3's (tests/zoo/storage.py). The exact URL Hub hands out is not in Docker's docs, nor
  whether Hub redirects a blob HEAD too: the zoo does, with a URL signed for HEAD, as
  distribution's s3-aws driver signs one.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.zoo.registry import Asked, Registry, bearer_token, oci_error
from tests.zoo.storage import SignedStorage
from tests.zoo.tokens import TokenService, issued_at

SERVICE = "registry.docker.io"
WINDOW = 21600  # seconds: the limit's 6 hours
LIMITED = (
    "You have reached your pull rate limit. You may increase the limit by authenticating "
    "and upgrading: https://www.docker.com/increase-rate-limits"
)


class HubAuth(TokenService):
    """auth.docker.io: anonymous pulls of public repositories."""

    def __init__(self) -> None:
        super().__init__(service=SERVICE, expires_in=300)
        self.public: set[str] = set()

    def policy(self, subject: str | None, repository: str, actions: set[str]) -> set[str]:
        return {"pull"} & actions if repository in self.public else set()

    def answer(self, token: str) -> dict[str, Any]:
        return {"token": token, "access_token": token, "expires_in": 300, "issued_at": issued_at()}


class DockerHub(Registry):
    """registry-1.docker.io, with `auth` (its token service) and `storage` (its blob
    CDN), each a server of its own; `pull_limit` manifest GETs are answered, the rest
    429 (`pulls` counts them)."""

    def __init__(self, *, pull_limit: int = 100) -> None:
        super().__init__(storage=SignedStorage("s3"))
        self.auth = HubAuth()
        self.pull_limit = pull_limit
        self.pulls = 0

    def publish(self, repository: str) -> None:
        """Make `repository` public: anyone may pull it."""
        self.auth.public.add(repository)

    def challenge(self, asked: Asked, error: str | None = None) -> str:
        value = f'Bearer realm="{self.auth.realm}",service="{SERVICE}"'
        if asked.repository:
            value += f',scope="repository:{asked.repository}:pull"'
        if error:
            value += f',error="{error}"'
        return value

    def refuse(self, request: web.Request, asked: Asked) -> web.StreamResponse | None:
        token = bearer_token(request)
        grant = self.auth.grant(token) if token else None
        if grant is None or (asked.repository and not grant.allows(asked.repository, "pull")):
            error = None
            if token is not None:
                error = "invalid_token" if grant is None else "insufficient_scope"
            return oci_error(
                401,
                "UNAUTHORIZED",
                "authentication required",
                headers={"WWW-Authenticate": self.challenge(asked, error)},
            )
        if asked.kind == "manifests" and request.method == "GET":
            if self.pulls >= self.pull_limit:
                headers = self.manifest_headers(request, asked)
                return oci_error(429, "TOOMANYREQUESTS", LIMITED, headers=headers)
            self.pulls += 1
        return None

    def manifest_headers(self, request: web.Request, asked: Asked) -> dict[str, str]:
        left = max(self.pull_limit - self.pulls, 0)
        return {
            "ratelimit-limit": f"{self.pull_limit};w={WINDOW}",
            "ratelimit-remaining": f"{left};w={WINDOW}",
            "docker-ratelimit-source": request.remote or "",
        }
