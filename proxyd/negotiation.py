"""Content negotiation of manifests: what a client's `Accept` admits, and whether an
answer upstream gave for a tag to one Accept is the answer it would give another.

That second question is what lets one resolution of a tag serve docker, containerd,
podman, skopeo and `proxyd prefetch` alike, though each sends its own Accept. Each
rule, with its source:

- `Accept` is a comma-separated list of media ranges, in one header line or several,
  each range with parameters after `;` (RFC 9110 §12.5.1; distribution 2.8 reads it
  the same way in registry/handlers/manifests.go, `GetManifest`). A range without a
  `/` is skipped, as distribution skips what `mime.ParseMediaType` refuses.
- `*/*` admits every media type and `type/*` every subtype of `type` (RFC 9110
  §12.5.1); types compare case-insensitively (RFC 9110 §8.3.1).
- `q=0` means "not acceptable" (RFC 9110 §12.4.2). distribution ignores q values
  (manifests.go: "we don't care about q= values"); no engine sends `q=0`.
- No Accept at all (or only empty lines): the distribution spec says a client SHOULD
  send one (spec.md, "Pulling manifests") and names no default, and RFC 9110 §12.5.1
  reads a request without Accept as accepting any media type. proxyd asks upstream
  for such a client with every manifest type it knows (`upstream_accept`), so any
  answer serves it.
- A registry answers a tag with the manifest the tag holds whenever the Accept admits
  its type. Otherwise distribution 2.8 rewrites two types, by tag only: a Docker
  manifest list into its linux/amd64 manifest, and a Docker schema 2 manifest into
  schema 1 (manifests.go, `GetManifest`); OCI types are never rewritten (a 404
  instead), and Docker Hub behaves the same. So an answer asked for with an Accept
  that left out one of those two types may be a rewrite: it is given only to a
  client that leaves out the same ones (`may_take`). An answer asked for with both
  admitted is the tag's own manifest, right for every client that admits its type.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from proxyd.manifests import DOCKER_LIST, DOCKER_MANIFEST, MANIFEST_TYPES

# What distribution rewrites for a client that does not accept it (see above).
REWRITTEN = (DOCKER_LIST, DOCKER_MANIFEST)


@dataclass(frozen=True, slots=True)
class Accept:
    """A client's Accept, read once: `values` as sent (what goes upstream), `ranges`
    the media ranges it admits (lower case, without parameters); `ranges` is None
    when the client sent none, which admits anything."""

    values: tuple[str, ...]
    ranges: frozenset[str] | None

    @classmethod
    def parse(cls, values: Iterable[str]) -> Accept:
        return _parse(tuple(values))

    @property
    def key(self) -> str:
        """The same for every Accept that admits the same ranges: the same question."""
        return "*" if self.ranges is None else ",".join(sorted(self.ranges))

    def admits(self, media_type: str) -> bool:
        if self.ranges is None or "*/*" in self.ranges:
            return True
        kind = media_type.split(";", 1)[0].strip().lower()
        return kind in self.ranges or f"{kind.split('/', 1)[0]}/*" in self.ranges


@lru_cache(maxsize=256)  # a handful of engines, each sending the same lines every time
def _parse(values: tuple[str, ...]) -> Accept:
    ranges: set[str] = set()
    named = False
    for value in values:
        for item in value.split(","):
            kind, *params = (part.strip() for part in item.split(";"))
            if not kind:
                continue
            named = True
            if "/" not in kind or _quality(params) == 0:
                continue
            ranges.add(kind.lower())
    return Accept(values, frozenset(ranges) if named else None)


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 1.0  # a malformed weight: read as if absent, as distribution does
    return 1.0


ANY = Accept.parse(())
EVERY_MANIFEST_TYPE = Accept.parse(MANIFEST_TYPES)


def upstream_accept(client: Accept) -> Accept:
    """What proxyd asks upstream with for `client`: its own Accept, or every manifest
    type proxyd knows when it sent none (a registry would otherwise answer only
    Docker's schema 2, or refuse)."""
    return EVERY_MANIFEST_TYPE if client.ranges is None else client


def may_take(client: Accept, media_type: str, asked_with: Accept) -> bool:
    """Whether a tag's answer of `media_type`, which upstream gave to `asked_with`,
    is the answer upstream would give `client` (see the module docstring)."""
    if client.key == asked_with.key:  # the same question gets the same answer
        return True
    if not client.admits(media_type):
        return False
    return all(asked_with.admits(kind) or not client.admits(kind) for kind in REWRITTEN)
