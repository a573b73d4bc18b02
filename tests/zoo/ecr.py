"""An Amazon ECR private registry as the zoo reproduces it: Basic auth with a password
that lasts 12 hours, handed out by a credential helper, and layers from S3.

Each behaviour, and where it comes from:

- Passwords: `GetAuthorizationToken` returns "a base64 encoded string that can be
  decoded and used in a docker login command"; "The authorization token is valid for 12
  hours" (docs.aws.amazon.com/AmazonECR/latest/APIReference/API_GetAuthorizationToken.html);
  decoded it is `AWS:<password>`, `AWS` being the user name `docker login` is given
  (docs.aws.amazon.com/AmazonECR/latest/userguide/registry_auth.html). The Amazon ECR
  Docker Credential Helper (awslabs/amazon-ecr-credential-helper), configured in
  docker's `credHelpers` as `ecr-login`, calls it when asked; here the helper reads the
  password this registry issued last (`authorization_token`), as if it had called it.
- The challenge: `Basic realm="https://111111111111.dkr.ecr.us-east-1.amazonaws.com/",
  service="ecr.amazonaws.com"` (mayflower/docker-ls#28 quotes it). The requests carry
  `Authorization: Basic QVdT…` (open-policy-agent/opa#6580).
- An expired password is refused 403 `DENIED`, "Your authorization token has expired.
  Reauthenticate and try again.", without a challenge (flipt-io/flipt#3043: "response
  status code 403: denied: Your authorization token has expired"; awslabs/
  soci-snapshotter#1148 and bazel-contrib/rules_img#715 saw the same 403). A password
  ECR never issued is answered like no password, with the challenge: what ECR does then
  was not found, nor the text of its 401 (the zoo's is "Not Authorized").
- Layers: blob GETs are answered 307 to "the pre-signed Amazon S3 download URL"
  (GetDownloadUrlForLayer, docs.aws.amazon.com/AmazonECR/latest/APIReference/
  API_GetDownloadUrlForLayer.html; the 307 as opa#6580 shows it), which refuses the
  registry's `Authorization` (opa#6728; tests/zoo/storage.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import sys
from pathlib import Path

from aiohttp import web

from tests.zoo.registry import Asked, Registry, oci_error
from tests.zoo.storage import SignedStorage

EXPIRED = "Your authorization token has expired. Reauthenticate and try again."
# What `docker-credential-ecr-login get` does here: answer the password ECR issued
# last, and note that it was asked.
HELPER = """\
#!{python}
import json, sys
server = sys.stdin.read().strip()
with open({asked!r}, "a") as asked:
    asked.write(server + "\\n")
secret = open({password!r}).read().strip()
print(json.dumps({{"ServerURL": server, "Username": "AWS", "Secret": secret}}))
"""


class Ecr(Registry):
    """An ECR registry whose passwords (`authorization_token`) expire when `rotate`
    says 12 hours have passed; `state` is where the credential helper reads them."""

    def __init__(self, state: Path) -> None:
        super().__init__(storage=SignedStorage("s3"))
        state.mkdir(parents=True, exist_ok=True)
        self.password_file = state / "authorization-token"
        self.helper_log = state / "helper-asked"
        self.helper_log.write_text("")
        self.valid: set[str] = set()
        self.expired: set[str] = set()
        self.authorization_token()

    def authorization_token(self) -> str:
        """GetAuthorizationToken: a new password, valid for 12 hours."""
        password = "ecr-" + secrets.token_urlsafe(24)
        self.valid.add(password)
        self.password_file.write_text(password)
        return password

    def rotate(self) -> str:
        """12 hours later: every password issued so far has expired; a new one is
        issued (and is what the helper answers from now on)."""
        self.expired |= self.valid
        self.valid.clear()
        return self.authorization_token()

    def helper_asked(self) -> list[str]:
        """The server URLs the credential helper was asked for, in order."""
        return self.helper_log.read_text().splitlines()

    def install_helper(self, bin_dir: Path) -> Path:
        """`docker-credential-ecr-login` in `bin_dir`, answering from this registry."""
        bin_dir.mkdir(parents=True, exist_ok=True)
        helper = bin_dir / "docker-credential-ecr-login"
        helper.write_text(
            HELPER.format(
                python=sys.executable, asked=str(self.helper_log), password=str(self.password_file)
            )
        )
        helper.chmod(0o755)
        return helper

    def docker_config(self, path: Path) -> Path:
        """A docker config.json sending this registry's host to the helper."""
        path.write_text(json.dumps({"credHelpers": {self.host: "ecr-login"}}))
        return path

    def password_sent(self, request_header: str | None) -> str | None:
        """The password of a Basic `Authorization` for user `AWS`."""
        scheme, _, encoded = (request_header or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password if user == "AWS" else None

    def refuse(self, request: web.Request, asked: Asked) -> web.StreamResponse | None:
        password = self.password_sent(request.headers.get("Authorization"))
        if password in self.valid:
            return None
        if password in self.expired:
            return oci_error(403, "DENIED", EXPIRED)
        challenge = f'Basic realm="https://{self.host}/",service="ecr.amazonaws.com"'
        return oci_error(
            401, "UNAUTHORIZED", "Not Authorized", headers={"WWW-Authenticate": challenge}
        )
