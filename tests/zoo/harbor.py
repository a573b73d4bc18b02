"""Harbor as the zoo reproduces it: a proxy-cache project, whose images are pulled under
the project's path (`<harbor>/<project>/library/alpine:3`), with Harbor's token service
and its ways of challenging.

Each behaviour, and where it comes from (Harbor's source, goharbor/harbor, unless said):

- Projects: "configure your docker pull commands and pod manifests to pull images from
  the proxy cache project instead of the target registry"
  (goharbor.io/docs/latest/administration/configure-proxy-cache/); the project is the
  first component of the repository name, so the API is served under
  `/v2/<project>/...`, what containerd reaches with a host whose URL has that path and
  `override_path = true` (containerd's docs/hosts.md, "override_path field", and
  core/remotes/docker/config/hosts.go). How the cache fills itself from its upstream is
  not modelled: the images are there.
- The challenge (src/server/middleware/v2auth/auth.go, `getChallenge`): to a request
  without `Authorization`, `Bearer realm="<harbor>/service/token",service=
  "harbor-registry",scope="repository:<project>/<repo>:pull"`; to one whose
  `Authorization` is refused, `Basic realm="harbor"`. A `HEAD` of a repository without
  `Authorization` is always challenged, even in a public project ("make sure 401 is
  returned for CLI HEAD, see #11271"); a `GET` of a public project needs nothing.
- Who may pull: anyone in a public project, a robot account where it is a member (both
  by Harbor's RBAC; the zoo's robot is a member of every project). Basic credentials
  are taken on every request (src/server/middleware/security/basic_auth.go, robot.go).
  A token allows what its access names, per project: the first component of each
  access name (src/common/security/v2token/context.go: `m[l[0]] = actionMap`).
- The token service (src/core/service/token/): `GET /service/token` only (token.go's
  `Handler` has `Get`; beego answers other methods 405), scopes repeated or
  space-separated (creator.go's `parseScopes`), each granted the actions the requester
  has in that repository's project, and nothing for a project that does not exist
  ("project %s does not exist, set empty permission"); the answer is `{"token",
  "expires_in", "issued_at"}`, `expires_in` being `token_expiration` minutes * 60
  (authutils.go, `makeTokenCore`), 30 minutes assumed (that setting's default; not
  checked here).
- Blobs are served by Harbor itself, as with its default filesystem storage (its
  registry's `storage.redirect` is only set when configured:
  make/photon/prepare/templates/registry/config.yml.jinja).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web

from tests.zoo.registry import Asked, Registry, bearer_token, oci_error
from tests.zoo.tokens import TokenService, issued_at

SERVICE = "harbor-registry"
TOKEN_EXPIRATION = 30  # minutes
PROXY_PROJECT = "dockerhub-proxy"  # the zoo's proxy-cache project of Docker Hub
ROBOT = ("robot$zoo+cache", "Rb7-secret-9f2c")  # the zoo's robot account: name, secret


class HarborTokens(TokenService):
    """/service/token: what the requester may do in each named project."""

    path = "/service/token"

    def __init__(self, harbor: Harbor) -> None:
        super().__init__(service=SERVICE, expires_in=TOKEN_EXPIRATION * 60)
        self.harbor = harbor

    def policy(self, subject: str | None, repository: str, actions: set[str]) -> set[str]:
        return {"pull"} if self.harbor.may_pull(subject, repository.split("/")[0]) else set()

    def answer(self, token: str) -> dict[str, Any]:
        return {"token": token, "expires_in": TOKEN_EXPIRATION * 60, "issued_at": issued_at()}


class Harbor(Registry):
    """Harbor's core: the registry API and `tokens` on one server. `projects` maps a
    project's name to whether it is public; `robots` are the robot accounts (name ->
    secret), members of every project."""

    def __init__(self) -> None:
        self.tokens = HarborTokens(self)
        super().__init__()
        self.projects: dict[str, bool] = {}
        self.robots: dict[str, str] = {}

    @property
    def origin(self) -> str:
        return self.tokens.origin

    @origin.setter
    def origin(self, value: str) -> None:
        self.tokens.origin = value  # the token service is Harbor's own (its external URL)

    def project(self, name: str, *, public: bool) -> None:
        self.projects[name] = public

    def robot(self, name: str, secret: str) -> None:
        self.robots[name] = secret
        self.tokens.users[name] = secret

    def may_pull(self, subject: str | None, project: str) -> bool:
        if project not in self.projects:
            return False
        return self.projects[project] or subject in self.robots

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", self.tokens.path, self.tokens._handle)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def challenge(self, request: web.Request, asked: Asked) -> web.Response:
        if "Authorization" in request.headers:
            value = 'Basic realm="harbor"'
        else:
            value = f'Bearer realm="{self.tokens.realm}",service="{SERVICE}"'
            if asked.repository:
                value += f',scope="repository:{asked.repository}:pull"'
        return oci_error(401, "UNAUTHORIZED", "unauthorized", headers={"WWW-Authenticate": value})

    def refuse(self, request: web.Request, asked: Asked) -> web.StreamResponse | None:
        authorization = request.headers.get("Authorization")
        if authorization is None:
            if not asked.repository or request.method == "HEAD":
                return self.challenge(request, asked)
            public = self.projects.get(asked.repository.split("/")[0], False)
            return None if public else self.challenge(request, asked)
        project = asked.repository.split("/")[0]
        token = bearer_token(request)
        if token is not None:
            grant = self.tokens.grant(token)
            projects = {name.split("/")[0] for name in grant.access} if grant else set()
            allowed = grant is not None and (not asked.repository or project in projects)
        else:
            robot = self._robot(authorization)
            allowed = robot is not None and (not asked.repository or self.may_pull(robot, project))
        return None if allowed else self.challenge(request, asked)

    def _robot(self, authorization: str) -> str | None:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, secret = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return name if self.robots.get(name) == secret else None
