"""Where proxyd's upstream credentials come from: docker's config.json and the
credential helpers it names, read into `Credential`s keyed by registry host.

A room of its own so the authorizer needs only this, not the settings machinery: it
imports nothing of proxyd's configuration and raises `CredentialsError`, which
`proxyd.config` reports as a configuration error with the same message.

config.json names a helper for every registry in `auths` (`credsStore`) or per
registry (`credHelpers`). `docker-credential-<name> get` reads the server URL on stdin
(docker's spelling: `https://index.docker.io/v1/` for Docker Hub, the registry host
otherwise) and prints `{"ServerURL": …, "Username": …, "Secret": …}`; a `Username` of
`<token>` makes the Secret an identity token. When it has nothing for that server it
prints `credentials not found in native keychain` and exits 1: no credentials, not a
failure (docker-credential-helpers' `IsErrCredentialsNotFoundMessage`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxyd.reference import DOCKER_HUB

HELPER_TIMEOUT = 10.0
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
TOKEN_USERNAME = "<token>"  # noqa: S105 (docker's marker, not a secret)
NOT_FOUND = "credentials not found in native keychain"
HELPER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CredentialsError(ValueError):
    """A docker config or credential helper proxyd cannot use: the message says which,
    where, and what to do about it."""


class Credential(BaseModel):
    """Credentials for one registry host (`[credentials."host:port"]`)."""

    model_config = ConfigDict(extra="forbid")

    username: str | None = None
    password: str | None = Field(None, repr=False)
    identity_token: str | None = Field(None, repr=False)  # an OAuth2 refresh token
    registry_token: str | None = Field(None, repr=False)  # a bearer token used as is

    def __repr__(self) -> str:  # never print secrets, even by accident
        return f"Credential(username={self.username!r})"


# -- docker's config.json -----------------------------------------------------------------


def read_docker_config(path: Path) -> dict[str, Credential]:
    """docker's config.json `auths`: `auth` (base64 user:password), `username` and
    `password`, or `identitytoken`; keyed by registry host as docker writes it."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CredentialsError(f"cannot read docker config {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"docker config {path} is not JSON: {exc}") from None
    auths = data.get("auths", {}) if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        raise CredentialsError(f"docker config {path}: expected an object with an `auths` object")
    found: dict[str, Credential] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise CredentialsError(f"docker config {path}: auths.{key} is not an object")
        username, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            username, password = _decode_auth(entry["auth"], f"{path}: auths.{key}.auth")
        try:
            found[_docker_config_host(key)] = Credential(
                username=username or None,
                password=password or None,
                identity_token=entry.get("identitytoken") or None,
                registry_token=entry.get("registrytoken") or None,
            )
        except ValidationError as exc:
            raise CredentialsError(_explain(exc, path)) from None
    for host, (helper, source) in _docker_helpers(data, auths, path).items():
        found.pop(host, None)  # as docker: a helper's answer replaces the file's entry
        credential = _from_helper(helper, host, source, path)
        if credential is not None:
            found[host] = credential
    return found


def _explain(exc: ValidationError, path: Path) -> str:
    """Worded as `proxyd.config` words an invalid settings file, naming each field."""
    fields = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return "\n".join([f"invalid configuration in {path}:", *fields])


def _docker_helpers(
    data: dict[str, Any], auths: dict[str, Any], path: Path
) -> dict[str, tuple[str, str]]:
    """Registry host -> (credential helper, the setting naming it): `credsStore` for
    every registry in `auths`, `credHelpers` per registry (winning, as in docker)."""
    store = data.get("credsStore") or None
    per_host = data.get("credHelpers") or {}
    if store is not None and not isinstance(store, str):
        raise CredentialsError(f"docker config {path}: credsStore must be a credential helper name")
    if not isinstance(per_host, dict) or not all(isinstance(v, str) for v in per_host.values()):
        raise CredentialsError(
            f"docker config {path}: credHelpers must map registries to helper names"
        )
    chosen = {_docker_config_host(key): (store, "credsStore") for key in auths if store}
    for key, helper in per_host.items():
        if helper:  # "" means no helper, as in docker
            chosen[_docker_config_host(key)] = (helper, f"credHelpers.{key}")
    return chosen


def _from_helper(helper: str, host: str, source: str, path: Path) -> Credential | None:
    """Ask `docker-credential-<helper> get` with the server URL docker would send."""
    server_url = DOCKER_HUB_SERVER_URL if host == "registry-1.docker.io" else host
    try:
        return ask_helper(helper, server_url)
    except CredentialsError as exc:
        raise CredentialsError(f"docker config {path}: {source} (for {host}): {exc}") from None


def _decode_auth(value: object, where: str) -> tuple[str, str]:
    """`auth` is base64 of `user:password`; docker refuses anything else, and so do we."""
    try:
        decoded = base64.b64decode(value, validate=True).decode()  # type: ignore[arg-type]
    except (TypeError, ValueError, UnicodeDecodeError):
        raise CredentialsError(f"{where} is not base64 of user:password") from None
    username, sep, password = decoded.partition(":")
    if not sep or not username:
        raise CredentialsError(f"{where} does not decode to user:password")
    return username, password


def _docker_config_host(key: str) -> str:
    """docker writes `https://index.docker.io/v1/` for Docker Hub and may write URLs."""
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return "registry-1.docker.io" if host in ("index.docker.io", DOCKER_HUB) else host


# -- the credential helper protocol -------------------------------------------------------


def program(name: str) -> str:
    return f"docker-credential-{name}"


def ask_helper(name: str, server_url: str, *, timeout: float | None = None) -> Credential | None:
    """`docker-credential-<name> get` for `server_url`, exactly as docker calls it;
    None when it has none."""
    timeout = HELPER_TIMEOUT if timeout is None else timeout
    if not HELPER_NAME_RE.fullmatch(name):
        raise CredentialsError(f"{name!r} is not a credential helper name (docker-credential-NAME)")
    exe = shutil.which(program(name))
    if exe is None:
        raise CredentialsError(
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
        raise CredentialsError(f"cannot run {exe}: {exc.strerror or exc}") from None
    try:
        out, err = proc.communicate(server_url.encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CredentialsError(
            f"{program(name)} get did not answer for {server_url} within {timeout:g} s "
            "(is it waiting for a keychain to be unlocked or a password?); check that "
            f"`echo {server_url} | {program(name)} get` answers as proxyd's user"
        ) from None
    said = (out.decode(errors="replace") + "\n" + err.decode(errors="replace")).strip()
    if proc.returncode != 0:
        if NOT_FOUND in said:
            return None
        raise CredentialsError(
            f"{program(name)} get failed for {server_url} (exit status {proc.returncode}"
            f"{': ' + _short(said) if said else ''}); check that "
            f"`echo {server_url} | {program(name)} get` works as proxyd's user, or log in "
            "again with docker login"
        )
    return _parse(name, server_url, out)


def _parse(name: str, server_url: str, out: bytes) -> Credential | None:
    try:
        data = json.loads(out)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k, ""), str) for k in ("Username", "Secret")
    ):
        raise CredentialsError(
            f"{program(name)} get for {server_url} did not print a JSON object with "
            'string "Username" and "Secret" (docker\'s credential helper protocol); '
            "is it a docker credential helper?"
        )
    username, secret = data.get("Username") or None, data.get("Secret") or None
    if username is None and secret is None:
        return None
    if username == TOKEN_USERNAME:
        return Credential(identity_token=secret)
    return Credential(username=username, password=secret)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
