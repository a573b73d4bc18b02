"""A tag's record in the small-response cache: every answer upstream gave for the
tag, each with the Accept it was asked with, under one key per (namespace,
repository, tag) whatever the client accepts.

A client is served the first answer it may take (`proxyd.negotiation.may_take`):
one resolution serves every engine that admits its media type, and a client that
cannot take any (a Docker schema 2 client, the tag holding a manifest list) gets its
own answer from upstream, kept beside the others. The first answer is the one a
revalidation compares (one HEAD per tag, with that answer's Accept): if it still
stands, the tag has not moved and every answer stands with it; if it moved, they
all go.

The record is JSON with a `version`. A record of another version, or one that does
not read as this one (a damaged row, bytes that do not match their digest: the
record may come from a Redis shared with other replicas), is ignored, read as no
record at all, and replaced by the next answer; older proxyd releases kept tags
under other keys (with the Accept set in them), which are never read again and
which `max_age` prunes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from proxyd.errors import ProxydError
from proxyd.negotiation import Accept, may_take
from proxyd.reference import Digest

VERSION = 2
MAX_ANSWERS = 8  # a handful of Accept families; more would mean a client varying its own


@dataclass(frozen=True, slots=True)
class Answer:
    """What decides who may take an answer, without its bytes (kept in memory)."""

    digest: Digest  # what proxyd serves (a converted legacy config has its own)
    media_type: str
    asked_with: Accept

    def serves(self, client: Accept) -> bool:
        return may_take(client, self.media_type, self.asked_with)


@dataclass(frozen=True, slots=True)
class CachedAnswer(Answer):
    upstream_digest: Digest  # what upstream announced: what a revalidation compares
    body: bytes

    def light(self) -> Answer:
        return Answer(self.digest, self.media_type, self.asked_with)

    def to_json(self) -> dict[str, Any]:
        return {
            "media_type": self.media_type,
            "digest": str(self.digest),
            "upstream_digest": str(self.upstream_digest),
            "accept": list(self.asked_with.values),
            "body": base64.b64encode(self.body).decode(),
        }

    @classmethod
    def from_json(cls, data: Any) -> CachedAnswer:
        """ValueError when `data` is not an answer of this version."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        try:
            accept = data["accept"]
            if not isinstance(accept, list) or not all(isinstance(a, str) for a in accept):
                raise ValueError("accept is not a list of strings")
            digest = Digest.parse(str(data["digest"]))
            body = base64.b64decode(str(data["body"]), validate=True)
            answer = cls(
                digest,
                str(data["media_type"]),
                Accept.parse(accept),
                Digest.parse(str(data["upstream_digest"])),
                body,
            )
        except (KeyError, ProxydError) as exc:
            raise ValueError(f"not an answer: {exc}") from None
        if not digest.matches(body):
            raise ValueError(f"bytes that are not {digest}")
        return answer


@dataclass(frozen=True)
class TagRecord:
    answers: tuple[CachedAnswer, ...]  # never empty; the first is revalidated

    @property
    def first(self) -> CachedAnswer:
        return self.answers[0]

    def for_client(self, client: Accept) -> CachedAnswer | None:
        return next((a for a in self.answers if a.serves(client)), None)

    def beside(self, answer: CachedAnswer) -> TagRecord:
        """This record with `answer` added last; the first kept, the oldest others
        dropped beyond MAX_ANSWERS."""
        rest = (*self.answers[1:], answer)[-(MAX_ANSWERS - 1) :]
        return TagRecord((self.first, *rest))

    def light(self) -> tuple[Answer, ...]:
        return tuple(a.light() for a in self.answers)

    def to_value(self) -> dict[str, Any]:
        return {"version": VERSION, "answers": [a.to_json() for a in self.answers]}

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> TagRecord:
        """ValueError when `value` is not a record of this version (see the module
        docstring: the caller ignores it)."""
        if value.get("version") != VERSION:
            raise ValueError(f"version {value.get('version')!r}, not {VERSION}")
        answers = value.get("answers")
        if not isinstance(answers, list) or not answers:
            raise ValueError("no answers")
        return cls(tuple(CachedAnswer.from_json(a) for a in answers))
