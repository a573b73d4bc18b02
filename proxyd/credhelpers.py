"""docker credential helpers: `docker-credential-<name> get`, exactly as docker calls them.

docker's config.json names a helper for every registry in `auths` (`credsStore`) or
per registry (`credHelpers`). The helper reads the server URL on stdin (docker's
spelling: `https://index.docker.io/v1/` for Docker Hub, the registry host otherwise)
and prints `{"ServerURL": …, "Username": …, "Secret": …}`; a `Username` of
`<token>` makes the Secret an identity token. When it has nothing for that server it
prints `credentials not found in native keychain` and exits 1: no credentials, not a
failure (docker-credential-helpers' `IsErrCredentialsNotFoundMessage`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

HELPER_TIMEOUT = 10.0
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
TOKEN_USERNAME = "<token>"  # noqa: S105 (docker's marker, not a secret)
NOT_FOUND = "credentials not found in native keychain"
HELPER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class HelperError(Exception):
    """A helper that could not be run or gave no usable answer: the message says
    which, and what to do about it."""


@dataclass(frozen=True)
class HelperCredential:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)


def program(name: str) -> str:
    return f"docker-credential-{name}"


def get(name: str, server_url: str, *, timeout: float | None = None) -> HelperCredential | None:
    """`docker-credential-<name> get` for `server_url`; None when it has none."""
    timeout = HELPER_TIMEOUT if timeout is None else timeout
    if not HELPER_NAME_RE.fullmatch(name):
        raise HelperError(f"{name!r} is not a credential helper name (docker-credential-NAME)")
    exe = shutil.which(program(name))
    if exe is None:
        raise HelperError(
            f"{program(name)} is not on PATH ({os.environ.get('PATH', '')}): install it, "
            "put its directory on proxyd's PATH, or remove it from the docker config"
        )
    try:
        proc = subprocess.Popen(
            [exe, "get"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so a timeout can stop whatever it started too
        )
    except OSError as exc:
        raise HelperError(f"cannot run {exe}: {exc.strerror or exc}") from None
    try:
        out, err = proc.communicate(server_url.encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise HelperError(
            f"{program(name)} get did not answer for {server_url} within {timeout:g} s "
            "(is it waiting for a keychain to be unlocked or a password?); check that "
            f"`echo {server_url} | {program(name)} get` answers as proxyd's user"
        ) from None
    said = (out.decode(errors="replace") + "\n" + err.decode(errors="replace")).strip()
    if proc.returncode != 0:
        if NOT_FOUND in said:
            return None
        raise HelperError(
            f"{program(name)} get failed for {server_url} (exit status {proc.returncode}"
            f"{': ' + _short(said) if said else ''}); check that "
            f"`echo {server_url} | {program(name)} get` works as proxyd's user, or log in "
            "again with docker login"
        )
    return _parse(name, server_url, out)


def _parse(name: str, server_url: str, out: bytes) -> HelperCredential | None:
    try:
        data = json.loads(out)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k, ""), str) for k in ("Username", "Secret")
    ):
        raise HelperError(
            f"{program(name)} get for {server_url} did not print a JSON object with "
            'string "Username" and "Secret" (docker\'s credential helper protocol); '
            "is it a docker credential helper?"
        )
    username, secret = data.get("Username") or None, data.get("Secret") or None
    if username is None and secret is None:
        return None
    if username == TOKEN_USERNAME:
        return HelperCredential(identity_token=secret)
    return HelperCredential(username=username, password=secret)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
