"""What a client's Accept admits, and which cached tag answer a client may take
(proxyd/negotiation.py), and the tag record that keeps the answers
(proxyd/tagrecord.py): pure, tested exhaustively and by property."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.manifests import DOCKER_LIST, DOCKER_MANIFEST, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST
from proxyd.negotiation import EVERY_MANIFEST_TYPE, Accept, may_take, upstream_accept
from proxyd.reference import Digest
from proxyd.tagrecord import MAX_ANSWERS, VERSION, CachedAnswer, TagRecord

CONTAINERD = Accept.parse([f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"])
SKOPEO = Accept.parse([OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_LIST, OCI_INDEX])
SCHEMA2_ONLY = Accept.parse([DOCKER_MANIFEST])
OCI_ONLY = Accept.parse([OCI_MANIFEST])


# -- Accept --------------------------------------------------------------------------------


def test_accept_reads_every_line_and_every_comma_separated_range():
    accept = Accept.parse([f"{OCI_MANIFEST},{DOCKER_LIST}", f" {OCI_INDEX} ; charset=x "])
    assert accept.ranges == {OCI_MANIFEST, DOCKER_LIST, OCI_INDEX}
    assert accept.values == (f"{OCI_MANIFEST},{DOCKER_LIST}", f" {OCI_INDEX} ; charset=x ")


def test_media_types_compare_without_case_and_without_parameters():
    accept = Accept.parse(["Application/VND.OCI.Image.Manifest.v1+JSON"])
    assert accept.admits(OCI_MANIFEST)
    assert accept.admits(f"{OCI_MANIFEST}; charset=utf-8")
    assert not accept.admits(OCI_INDEX)


@pytest.mark.parametrize(
    ("lines", "admitted", "refused"),
    [
        ([], [OCI_INDEX, "text/plain"], []),  # no Accept: anything (RFC 9110 §12.5.1)
        ([""], [OCI_INDEX], []),  # an empty line names nothing either
        (["*/*"], [OCI_INDEX, "text/plain"], []),
        (["application/*"], [OCI_INDEX, DOCKER_MANIFEST], ["text/plain"]),
        ([f"{OCI_INDEX};q=0, */*"], [OCI_MANIFEST], []),  # q=0 of a range, */* still
        ([f"{OCI_INDEX};q=0"], [], [OCI_INDEX, OCI_MANIFEST]),  # not acceptable
        ([f"{OCI_INDEX};q=0.0, {OCI_MANIFEST};q=0.5"], [OCI_MANIFEST], [OCI_INDEX]),
        ([f"{OCI_INDEX};q=high"], [OCI_INDEX], []),  # a weight that is no number: ignored
        (["nonsense, , json"], [], [OCI_INDEX]),  # ranges without a slash are skipped
    ],
)
def test_what_an_accept_admits(lines, admitted, refused):
    accept = Accept.parse(lines)
    assert [t for t in admitted if not accept.admits(t)] == []
    assert [t for t in refused if accept.admits(t)] == []


def test_a_client_without_accept_is_asked_for_with_every_manifest_type():
    assert upstream_accept(Accept.parse([])).values == MANIFEST_TYPES
    assert upstream_accept(Accept.parse([""])) is EVERY_MANIFEST_TYPE
    assert upstream_accept(SKOPEO) is SKOPEO


def test_the_same_ranges_are_the_same_question_however_they_are_written():
    a = Accept.parse([OCI_MANIFEST, DOCKER_LIST])
    b = Accept.parse([f"{DOCKER_LIST}, {OCI_MANIFEST};q=0.9", f"{DOCKER_LIST}"])
    assert a.key == b.key
    assert a.key != Accept.parse([OCI_MANIFEST]).key
    assert Accept.parse([]).key == "*"


# -- who may take an answer ----------------------------------------------------------------


def test_an_answer_asked_with_both_rewritable_types_admitted_serves_any_client_of_its_type():
    for asked_with in (CONTAINERD, SKOPEO, EVERY_MANIFEST_TYPE):
        for client in (CONTAINERD, SKOPEO, EVERY_MANIFEST_TYPE, Accept.parse([])):
            assert may_take(client, DOCKER_LIST, asked_with)
            assert may_take(client, OCI_INDEX, asked_with)
        assert not may_take(SCHEMA2_ONLY, OCI_INDEX, asked_with)  # not its type


def test_an_answer_that_may_be_a_rewrite_serves_only_clients_that_would_get_the_same():
    """A schema 2 client may have been given a list's amd64 manifest: a client that
    takes lists would be given the list itself, and so does not take it."""
    assert not may_take(CONTAINERD, DOCKER_MANIFEST, SCHEMA2_ONLY)
    assert not may_take(SKOPEO, DOCKER_MANIFEST, SCHEMA2_ONLY)
    assert may_take(Accept.parse([DOCKER_MANIFEST, OCI_MANIFEST]), DOCKER_MANIFEST, SCHEMA2_ONLY)
    # An OCI-only client left both Docker types out: its answer is no proof either.
    assert not may_take(SKOPEO, OCI_MANIFEST, OCI_ONLY)


def test_the_same_question_takes_the_answer_whatever_its_type():
    odd = Accept.parse(["application/json"])  # upstream answered it a schema 1 manifest
    assert may_take(Accept.parse(["application/json"]), "application/vnd.x", odd)


types = st.sampled_from([*MANIFEST_TYPES, "*/*", "application/*", "text/plain"])
accepts = st.lists(types, max_size=6).map(Accept.parse)


@given(accepts, st.sampled_from(MANIFEST_TYPES), accepts)
def test_a_client_is_only_given_an_answer_it_admits_or_asked_for_itself(client, kind, asked):
    if may_take(client, kind, asked):
        assert client.admits(kind) or client.key == asked.key


@given(accepts, st.sampled_from(MANIFEST_TYPES))
def test_the_tags_own_manifest_serves_every_client_that_admits_its_type(client, kind):
    assert may_take(client, kind, EVERY_MANIFEST_TYPE) == client.admits(kind)


# -- the tag record --------------------------------------------------------------------------


def answer(body: bytes, media_type: str = DOCKER_LIST, asked_with: Accept = SKOPEO):
    digest = Digest.of(body)
    return CachedAnswer(digest, media_type, asked_with, digest, body)


def test_a_record_reads_back_as_it_was_written():
    record = TagRecord((answer(b"{}"), answer(b"[]", DOCKER_MANIFEST, SCHEMA2_ONLY)))
    value = record.to_value()
    assert value["version"] == VERSION
    assert TagRecord.from_value(value) == record


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"version": 1, "answers": []},
        {"version": VERSION, "answers": []},
        {"version": VERSION, "answers": "x"},
        {"version": VERSION, "answers": [None]},
        {"version": VERSION, "answers": [{"digest": "sha256:x"}]},
    ],
)
def test_a_record_of_another_version_or_shape_does_not_read(value):
    with pytest.raises(ValueError):
        TagRecord.from_value(value)


def test_a_record_whose_bytes_are_not_their_digest_does_not_read():
    value = TagRecord((answer(b"{}"),)).to_value()
    value["answers"][0]["body"] = base64.b64encode(b"{ }").decode()
    with pytest.raises(ValueError, match="not sha256:"):
        TagRecord.from_value(value)
    value["answers"][0]["body"] = "not base64!"
    with pytest.raises(ValueError):
        TagRecord.from_value(value)


def test_a_client_is_given_the_first_answer_it_may_take():
    listed = answer(b'{"list": 1}')
    amd64 = answer(b'{"amd64": 1}', DOCKER_MANIFEST, SCHEMA2_ONLY)
    record = TagRecord((amd64,)).beside(listed)
    assert record.for_client(SCHEMA2_ONLY) == amd64
    assert record.for_client(CONTAINERD) == listed
    assert record.for_client(OCI_ONLY) is None


def test_answers_beside_the_first_are_bounded_and_the_first_stays():
    record = TagRecord((answer(b"0"),))
    for n in range(1, 3 * MAX_ANSWERS):
        record = record.beside(answer(str(n).encode(), asked_with=Accept.parse([str(n)])))
    assert len(record.answers) == MAX_ANSWERS
    assert record.first.body == b"0"
    assert record.answers[-1].body == str(3 * MAX_ANSWERS - 1).encode()
