"""Names, tags, digests and API paths, as the distribution grammar defines them.

Everything a client sends passes through these functions before it can reach a file
name or an upstream URL, so they are specified here example by example and by
properties over the whole grammar."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxyd.errors import (
    DigestInvalid,
    EndpointUnknown,
    NameInvalid,
    ProxydError,
    TagInvalid,
)
from proxyd.reference import (
    MAX_NAME_LENGTH,
    Digest,
    Endpoint,
    looks_like_host,
    normalize_repository,
    parse_api_path,
    parse_image_reference,
    validate_name,
    validate_tag,
)

SHA256_OF_EMPTY = "sha256:" + hashlib.sha256(b"").hexdigest()
SHA512_OF_EMPTY = "sha512:" + hashlib.sha512(b"").hexdigest()

# -- strategies: the distribution grammar, written out --------------------------------

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
alnum_runs = st.text(alphabet=ALNUM, min_size=1, max_size=8)
separators = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def components(draw: st.DrawFn) -> str:
    """`[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`"""
    parts = [draw(alnum_runs)]
    for _ in range(draw(st.integers(0, 3))):
        parts += [draw(separators), draw(alnum_runs)]
    return "".join(parts)


names = st.lists(components(), min_size=1, max_size=5).map("/".join)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
hex128 = st.text(alphabet="0123456789abcdef", min_size=128, max_size=128)
digests = st.one_of(hex64.map("sha256:{}".format), hex128.map("sha512:{}".format))
references = st.one_of(tags, digests)


# -- digests ----------------------------------------------------------------------------


def test_sha256_digest_parses_into_algorithm_and_hex():
    digest = Digest.parse(SHA256_OF_EMPTY)
    assert digest.algorithm == "sha256"
    assert digest.hex == hashlib.sha256(b"").hexdigest()


def test_sha512_digest_parses_with_its_128_hex_characters():
    assert Digest.parse(SHA512_OF_EMPTY).algorithm == "sha512"


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "a" * 63,  # one short
        "sha256:" + "a" * 65,  # one long
        "sha256:" + "a" * 128,  # a sha512 length under the sha256 name
        "sha512:" + "a" * 64,  # a sha256 length under the sha512 name
        "sha256:" + "A" * 64,  # upper case hex
        "sha256:" + "g" * 64,  # not hex
        "sha256:",
        ":" + "a" * 64,
        "sha256" + "a" * 64,  # no colon
        "sha256:" + "a" * 64 + "\n",
        " sha256:" + "a" * 64,
        "",
    ],
)
def test_malformed_digest_is_digest_invalid(text):
    with pytest.raises(DigestInvalid):
        Digest.parse(text)


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha384", "blake3", "sha256+b64u"])
def test_digest_with_an_algorithm_proxyd_cannot_verify_is_digest_invalid(algorithm):
    with pytest.raises(DigestInvalid, match="unsupported digest algorithm"):
        Digest.parse(f"{algorithm}:{'a' * 64}")


@settings(max_examples=200, deadline=None)
@given(digests)
def test_valid_digest_round_trips_through_str(text):
    assert str(Digest.parse(text)) == text


@settings(max_examples=100, deadline=None)
@given(hex64, st.integers(0, 63))
def test_any_upper_case_hex_digit_makes_a_digest_invalid(hex_, index):
    assume(hex_[index] in "abcdef")
    mutated = hex_[:index] + hex_[index].upper() + hex_[index + 1 :]
    with pytest.raises(DigestInvalid):
        Digest.parse(f"sha256:{mutated}")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=140))
def test_arbitrary_text_is_a_digest_or_digest_invalid_never_another_error(text):
    try:
        digest = Digest.parse(text)
    except DigestInvalid:
        return
    assert str(digest) == text


# -- repository names -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "app",
        "team/app",
        "library/ubuntu",
        "a/b/c/d",
        "my.app",
        "my_app",
        "my__app",
        "my-app",
        "my---app",
        "0/1",
        "a.b_c__d-e--f",
    ],
)
def test_names_of_the_distribution_grammar_are_accepted(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "App",  # upper case
        "team/App",
        "a..b",  # two dots are no separator
        "a___b",  # three underscores neither
        "a._b",  # nor mixed separators
        ".app",  # leading separator
        "app.",  # trailing separator
        "-app",
        "app-",
        "_app",
        "team/_app",
        "team/app_",
        "/app",  # empty first component
        "app/",  # empty last component
        "team//app",  # empty middle component
        "../etc",
        "team/../app",
        "a b",
        "a:b",
        "a@b",
        "café",
        "a\nb",
    ],
)
def test_names_outside_the_grammar_are_name_invalid(name):
    with pytest.raises(NameInvalid):
        validate_name(name)


def test_name_of_exactly_255_characters_is_accepted():
    name = "/".join(["a" * 49] * 5) + "/bbbbb"  # 5 * 50 + 5 = 255
    assert len(name) == MAX_NAME_LENGTH
    assert validate_name(name) == name


def test_name_longer_than_255_characters_is_name_invalid():
    name = "/".join(["a" * 49] * 5) + "/bbbbbb"
    assert len(name) == MAX_NAME_LENGTH + 1
    with pytest.raises(NameInvalid):
        validate_name(name)


@settings(max_examples=300, deadline=None)
@given(names)
def test_every_name_generated_from_the_grammar_is_accepted(name):
    assume(len(name) <= MAX_NAME_LENGTH)
    assert validate_name(name) == name


@settings(max_examples=200, deadline=None)
@given(names, st.data())
def test_a_name_containing_two_dots_is_rejected(name, data):
    at = data.draw(st.integers(0, len(name)))
    with pytest.raises(NameInvalid):
        validate_name(name[:at] + ".." + name[at:])


@settings(max_examples=200, deadline=None)
@given(names, st.data())
def test_a_name_containing_an_upper_case_letter_is_rejected(name, data):
    at = data.draw(st.integers(0, len(name)))
    letter = data.draw(st.sampled_from("ABCXYZ"))
    with pytest.raises(NameInvalid):
        validate_name(name[:at] + letter + name[at:])


@settings(max_examples=200, deadline=None)
@given(names, st.sampled_from([".", "_", "__", "-", "/"]), st.booleans())
def test_a_name_starting_or_ending_with_a_separator_is_rejected(name, separator, leading):
    with pytest.raises(NameInvalid):
        validate_name(separator + name if leading else name + separator)


@settings(max_examples=200, deadline=None)
@given(st.lists(components(), min_size=2, max_size=5), st.data())
def test_a_name_with_an_empty_component_is_rejected(parts, data):
    at = data.draw(st.integers(1, len(parts) - 1))
    with pytest.raises(NameInvalid):
        validate_name("/".join([*parts[:at], "", *parts[at:]]))


@settings(max_examples=200, deadline=None)
@given(components(), st.sampled_from([".", "_", "__", "-"]), components())
def test_a_separator_next_to_a_slash_is_rejected(left, separator, right):
    with pytest.raises(NameInvalid):
        validate_name(f"{left}{separator}/{right}")
    with pytest.raises(NameInvalid):
        validate_name(f"{left}/{separator}{right}")


# -- tags -------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["latest", "v1", "1.0.0", "v1.2-rc.3", "_private", "A_B-c.D"])
def test_tags_of_the_grammar_are_accepted(tag):
    assert validate_tag(tag) == tag


def test_tag_of_128_characters_is_accepted_and_129_is_tag_invalid():
    assert validate_tag("a" * 128)
    with pytest.raises(TagInvalid):
        validate_tag("a" * 129)


@pytest.mark.parametrize("tag", ["", ".hidden", "-dash", "v1/2", "v1:2", "v 1", "vé", "v1\n"])
def test_tags_outside_the_grammar_are_tag_invalid(tag):
    with pytest.raises(TagInvalid):
        validate_tag(tag)


@settings(max_examples=200, deadline=None)
@given(tags)
def test_every_tag_generated_from_the_grammar_is_accepted(tag):
    assert validate_tag(tag) == tag


# -- registry hosts and Docker Hub ------------------------------------------------------


@pytest.mark.parametrize(
    "component",
    ["localhost", "localhost:5000", "registry.example.com", "ghcr.io", "example:5000", "1.2.3.4"],
)
def test_a_first_component_with_a_dot_or_colon_or_localhost_is_a_host(component):
    assert looks_like_host(component)


@pytest.mark.parametrize("component", ["library", "team", "ubuntu", "local-host", "registry_1"])
def test_a_first_component_without_dot_or_colon_is_a_repository_part(component):
    assert not looks_like_host(component)


def test_one_component_docker_hub_names_live_under_library():
    assert normalize_repository("docker.io", "ubuntu") == "library/ubuntu"


@pytest.mark.parametrize(
    ("namespace", "repository"),
    [
        ("docker.io", "library/ubuntu"),
        ("docker.io", "team/app"),
        ("ghcr.io", "app"),
        ("registry.example.com:5000", "app"),
    ],
)
def test_other_names_are_left_as_they_are(namespace, repository):
    assert normalize_repository(namespace, repository) == repository


# -- API paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name", "endpoint", "reference"),
    [
        ("/v2/team/app/manifests/v1", "team/app", Endpoint.MANIFEST, "v1"),
        (f"/v2/app/manifests/{SHA256_OF_EMPTY}", "app", Endpoint.MANIFEST, SHA256_OF_EMPTY),
        (f"/v2/team/app/blobs/{SHA256_OF_EMPTY}", "team/app", Endpoint.BLOB, SHA256_OF_EMPTY),
        ("/v2/team/app/tags/list", "team/app", Endpoint.TAGS, ""),
        ("/v2/team/app/blobs/uploads/", "team/app", Endpoint.UPLOADS, ""),
        ("/v2/team/app/blobs/uploads/abc-123", "team/app", Endpoint.UPLOADS, "abc-123"),
        (
            f"/v2/team/app/referrers/{SHA256_OF_EMPTY}",
            "team/app",
            Endpoint.REFERRERS,
            SHA256_OF_EMPTY,
        ),
        ("/v2/ghcr.io/org/app/manifests/v1", "ghcr.io/org/app", Endpoint.MANIFEST, "v1"),
    ],
)
def test_api_paths_split_into_name_endpoint_and_reference(path, name, endpoint, reference):
    parsed = parse_api_path(path)
    assert (parsed.name, parsed.endpoint, parsed.reference) == (name, endpoint, reference)


@pytest.mark.parametrize(
    ("path", "name", "endpoint", "reference"),
    [
        ("/v2/manifests/app/manifests/v1", "manifests/app", Endpoint.MANIFEST, "v1"),
        ("/v2/team/blobs/manifests/v1", "team/blobs", Endpoint.MANIFEST, "v1"),
        ("/v2/a/manifests/b/manifests/c", "a/manifests/b", Endpoint.MANIFEST, "c"),
        (f"/v2/a/manifests/blobs/{SHA256_OF_EMPTY}", "a/manifests", Endpoint.BLOB, SHA256_OF_EMPTY),
        ("/v2/a/blobs/uploads/manifests/v1", "a/blobs/uploads", Endpoint.MANIFEST, "v1"),
        ("/v2/tags/list/tags/list", "tags/list", Endpoint.TAGS, ""),
    ],
)
def test_names_may_contain_endpoint_words_and_the_last_marker_wins(path, name, endpoint, reference):
    parsed = parse_api_path(path)
    assert (parsed.name, parsed.endpoint, parsed.reference) == (name, endpoint, reference)


def test_a_blob_reference_that_merely_starts_with_uploads_is_a_blob_reference():
    parsed = parse_api_path("/v2/team/app/blobs/uploadsabc")
    assert (parsed.name, parsed.endpoint, parsed.reference) == (
        "team/app",
        Endpoint.BLOB,
        "uploadsabc",
    )


def test_the_catalog_is_no_repository_path():
    with pytest.raises(EndpointUnknown):  # the app routes /v2/_catalog itself
        parse_api_path("/v2/_catalog")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/",
        "/v2/app",
        "/v2/team/app",
        "/v2/manifests/v1",  # no name before the marker
        "/v2/app/manifests/",  # no reference
        "/v2/app/manifests/a/b",
        "/v2/app/tags/list/",
        "/v2/app/tags",
        "/v2/app/unknown/v1",
        "/v3/app/manifests/v1",
        "/app/manifests/v1",
        "v2/app/manifests/v1",
    ],
)
def test_paths_that_are_no_api_endpoint_are_endpoint_unknown(path):
    with pytest.raises(EndpointUnknown):
        parse_api_path(path)


@settings(max_examples=300, deadline=None)
@given(names, references)
def test_manifest_path_of_a_valid_name_and_reference_gives_both_back(name, reference):
    parsed = parse_api_path(f"/v2/{name}/manifests/{reference}")
    assert (parsed.name, parsed.endpoint, parsed.reference) == (
        name,
        Endpoint.MANIFEST,
        reference,
    )


@settings(max_examples=200, deadline=None)
@given(names, digests)
def test_blob_path_of_a_valid_name_and_digest_gives_both_back(name, digest):
    parsed = parse_api_path(f"/v2/{name}/blobs/{digest}")
    assert (parsed.name, parsed.endpoint, parsed.digest) == (
        name,
        Endpoint.BLOB,
        Digest.parse(digest),
    )


@settings(max_examples=200, deadline=None)
@given(names)
def test_tag_list_path_of_a_valid_name_gives_the_name_back(name):
    parsed = parse_api_path(f"/v2/{name}/tags/list")
    assert (parsed.name, parsed.endpoint) == (name, Endpoint.TAGS)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80).map("/v2/{}".format))
def test_arbitrary_paths_parse_or_raise_a_proxyd_error(path):
    try:
        parsed = parse_api_path(path)
    except ProxydError:
        return
    assert parsed.name
    assert parsed.name in path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ("docker.io", "library/alpine", "latest")),
        ("alpine:3.20", ("docker.io", "library/alpine", "3.20")),
        ("ghcr.io/org/app:v1", ("ghcr.io", "org/app", "v1")),
        ("127.0.0.1:5001/team/app", ("127.0.0.1:5001", "team/app", "latest")),
        ("localhost/app:1", ("localhost", "app", "1")),
        ("team/app:v1@sha256:" + "a" * 64, ("docker.io", "team/app", "sha256:" + "a" * 64)),
    ],
)
def test_image_references_are_read_as_docker_reads_them(text, expected):
    image = parse_image_reference(text, "docker.io")
    assert (image.namespace, image.repository, image.reference) == expected


@pytest.mark.parametrize("text", ["Alpine", "app:-x", "app@sha256:short", ""])
def test_malformed_image_references_are_refused(text):
    with pytest.raises((NameInvalid, TagInvalid, DigestInvalid)):
        parse_image_reference(text, "docker.io")
