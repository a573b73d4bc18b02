"""Names, tags, digests and API paths, by the distribution grammar. Pure: no I/O.

Everything a client sends is checked here before it can reach a file name or an
upstream URL, so the rest of proxyd may trust a `Digest` or a repository name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import Enum

from proxyd.errors import DigestInvalid, EndpointUnknown, NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
HOST_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?"
)
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_LOWER_HEX_RE = re.compile(r"[0-9a-f]+")  # compiled here: not by a process's first blob request
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
MAX_NAME_LENGTH = 255

DOCKER_HUB = "docker.io"


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Accept only algorithms proxyd can verify, with the exact length of their hex."""
        match = _DIGEST_RE.fullmatch(text)
        if not match:
            raise DigestInvalid(f"invalid digest {text!r}")
        algorithm, encoded = match.groups()
        length = DIGEST_HEX_LENGTHS.get(algorithm)
        if length is None:
            raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
        if len(encoded) != length or not _LOWER_HEX_RE.fullmatch(encoded):
            raise DigestInvalid(f"invalid {algorithm} digest {text!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, body: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of `body` (small content: a manifest; blobs hash as they stream)."""
        return cls(algorithm, hashlib.new(algorithm, body).hexdigest())

    def matches(self, body: bytes) -> bool:
        """Whether `body` is the content this digest names."""
        return hashlib.new(self.algorithm, body).hexdigest() == self.hex


def is_digest(text: str) -> bool:
    return ":" in text


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name!r}")
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise TagInvalid(f"invalid tag {tag!r}")
    return tag


def looks_like_host(component: str) -> bool:
    """Docker's rule: a first path component is a registry host when it has '.' or ':'
    or is 'localhost'."""
    return ("." in component or ":" in component or component == "localhost") and HOST_RE.fullmatch(
        component
    ) is not None


def normalize_repository(namespace: str, repository: str) -> str:
    """Docker Hub's official images live under `library/`."""
    if namespace == DOCKER_HUB and "/" not in repository:
        return f"library/{repository}"
    return repository


class Endpoint(Enum):
    MANIFEST = "manifests"
    BLOB = "blobs"
    TAGS = "tags"
    REFERRERS = "referrers"
    UPLOADS = "uploads"


@dataclass(frozen=True)
class ApiPath:
    """A parsed `/v2/<name>/<endpoint>/<reference>` path; `name` may carry a host prefix."""

    name: str
    endpoint: Endpoint
    reference: str = ""

    @property
    def digest(self) -> Digest:
        return Digest.parse(self.reference)


_API_PATHS = [
    (re.compile(r"(?P<name>.+)/blobs/uploads(?:/(?P<ref>[^/]*))?"), Endpoint.UPLOADS),
    (re.compile(r"(?P<name>.+)/manifests/(?P<ref>[^/]+)"), Endpoint.MANIFEST),
    (re.compile(r"(?P<name>.+)/blobs/(?P<ref>[^/]+)"), Endpoint.BLOB),
    (re.compile(r"(?P<name>.+)/referrers/(?P<ref>[^/]+)"), Endpoint.REFERRERS),
    (re.compile(r"(?P<name>.+)/tags/list(?P<ref>)"), Endpoint.TAGS),
]


def parse_api_path(path: str) -> ApiPath:
    """Split a request path below `/v2/`. The name is validated later, once the
    namespace (which may be its first component) is known."""
    if not path.startswith("/v2/"):
        raise EndpointUnknown(f"unknown API path {path!r}")
    rest = path[len("/v2/") :]
    for pattern, endpoint in _API_PATHS:
        match = pattern.fullmatch(rest)
        if match:
            return ApiPath(match["name"], endpoint, match["ref"] or "")
    raise EndpointUnknown(f"unknown API path {path!r}")


@dataclass(frozen=True)
class ImageReference:
    """An image as people write it: `alpine`, `ghcr.io/org/app:v1`, `app@sha256:…`."""

    namespace: str
    repository: str
    reference: str  # a tag or a digest

    def __str__(self) -> str:
        separator = "@" if is_digest(self.reference) else ":"
        return f"{self.namespace}/{self.repository}{separator}{self.reference}"


def parse_image_reference(text: str, default_namespace: str) -> ImageReference:
    """Docker's rules: a first component with `.` or `:` (or `localhost`) is the
    registry; the tag defaults to `latest`; a digest wins over a tag."""
    rest, _, digest = text.partition("@")
    first, slash, remainder = rest.partition("/")
    if slash and looks_like_host(first):
        namespace, path = first, remainder
    else:
        namespace, path = default_namespace, rest
    name, colon, tag = path.rpartition(":")
    if not colon:
        name, tag = path, "latest"
    validate_name(name)
    if digest:
        Digest.parse(digest)
        return ImageReference(namespace, normalize_repository(namespace, name), digest)
    return ImageReference(namespace, normalize_repository(namespace, name), validate_tag(tag))
