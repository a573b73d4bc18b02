"""`WWW-Authenticate` challenges (RFC 7235) as registries send them, and which one
the authorizer chooses to answer."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.auth import Authorizer, Challenge, parse_www_authenticate
from proxyd.credentials import Credential
from proxyd.hostsfile import HostSettings, make_host

DOCKER_HUB_CHALLENGE = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/ubuntu:pull"'
)


def test_bearer_challenge_gives_realm_service_and_scope():
    assert parse_www_authenticate([DOCKER_HUB_CHALLENGE]) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/ubuntu:pull",
            },
        )
    ]


def test_commas_inside_a_quoted_value_belong_to_the_value():
    [challenge] = parse_www_authenticate(
        ['Bearer realm="https://auth.example/token",scope="repository:team/app:pull,push"']
    )
    assert challenge.params["scope"] == "repository:team/app:pull,push"
    assert challenge.params["realm"] == "https://auth.example/token"


def test_escaped_quotes_inside_a_quoted_value_are_unescaped():
    [challenge] = parse_www_authenticate([r'Basic realm="the \"inner\" realm", charset="UTF-8"'])
    assert challenge.params == {"realm": 'the "inner" realm', "charset": "UTF-8"}


def test_basic_challenge_is_recognised():
    assert parse_www_authenticate(['Basic realm="registry"']) == [
        Challenge("basic", {"realm": "registry"})
    ]


def test_a_scheme_without_parameters_is_a_challenge():
    assert parse_www_authenticate(["Basic"]) == [Challenge("basic", {})]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_and_parameter_names_are_case_insensitive(scheme):
    [challenge] = parse_www_authenticate([f'{scheme} Realm="https://auth.example/token"'])
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.example/token"}


def test_parameter_values_keep_their_case():
    [challenge] = parse_www_authenticate(['Bearer realm="https://Auth.Example/Token"'])
    assert challenge.params["realm"] == "https://Auth.Example/Token"


def test_unquoted_parameter_values_are_accepted():
    [challenge] = parse_www_authenticate(
        ["Bearer realm=https://auth.example/token,service=registry.example, scope=repo:pull"]
    )
    assert challenge.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repo:pull",
    }


def test_spaces_around_equals_and_commas_are_tolerated():
    [challenge] = parse_www_authenticate(['Bearer  realm = "r" ,  service = "s"'])
    assert challenge.params == {"realm": "r", "service": "s"}


def test_several_challenges_in_one_header_value_are_all_returned_in_order():
    challenges = parse_www_authenticate(
        ['Basic realm="simple", Bearer realm="https://auth.example/token", service="reg"']
    )
    assert challenges == [
        Challenge("basic", {"realm": "simple"}),
        Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg"}),
    ]


def test_the_rfc_7235_example_with_two_challenges_parses():
    challenges = parse_www_authenticate(
        [r'Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple"']
    )
    assert challenges == [
        Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
        Challenge("basic", {"realm": "simple"}),
    ]


def test_challenges_from_several_header_values_are_all_returned_in_order():
    challenges = parse_www_authenticate(['Basic realm="simple"', DOCKER_HUB_CHALLENGE])
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[1].params["service"] == "registry.docker.io"


def test_parameters_before_any_scheme_are_ignored():
    assert parse_www_authenticate(['realm="orphan", Basic realm="r"']) == [
        Challenge("basic", {"realm": "r"})
    ]


@pytest.mark.parametrize("values", [[], [""], ["   "], [","]])
def test_empty_headers_give_no_challenge(values):
    assert parse_www_authenticate(values) == []


def test_empty_list_elements_between_parameters_are_skipped():
    [challenge] = parse_www_authenticate(['Bearer realm="https://auth.example/token",,service="s"'])
    assert challenge.params == {"realm": "https://auth.example/token", "service": "s"}


header_text = st.lists(
    st.one_of(
        st.sampled_from([" ", ",", "=", '"', "\\", "Bearer", "Basic", "realm", "scope"]),
        st.text(max_size=5),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(header_text, max_size=3))
def test_arbitrary_header_text_never_raises_and_gives_lower_case_challenges(values):
    challenges = parse_www_authenticate(values)
    assert isinstance(challenges, list)
    for challenge in challenges:
        assert challenge.scheme == challenge.scheme.lower()
        assert all(key == key.lower() for key in challenge.params)


token_chars = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~+", min_size=1)
quoted_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40
)  # anything printable, including quotes, commas and backslashes


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(token_chars, quoted_values, min_size=1, max_size=4))
def test_any_quoted_parameter_value_round_trips_through_escaping(params):
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = "Bearer " + ", ".join(f"{key}={quote(value)}" for key, value in params.items())
    assert parse_www_authenticate([header]) == [Challenge("bearer", params)]


# -- which challenge the authorizer answers ---------------------------------------------

RUNTIME = make_host("https://registry.example", HostSettings(), is_mirror=False)
BASIC_PASSWORD = base64.b64encode(b"alice:wonderland").decode()


def authorizer(credential: Credential | None) -> Authorizer:
    """No session: every test here stays clear of token servers."""
    return Authorizer(None, lambda host: credential if host == RUNTIME.host else None)  # type: ignore[arg-type]


async def test_bearer_is_preferred_over_basic_whatever_the_order():
    credential = Credential(username="alice", password="wonderland", registry_token="tok")
    auth = authorizer(credential)
    assert auth.learn(RUNTIME, ['Basic realm="r"', 'Bearer realm="https://auth.example/t"'])
    assert await auth.authorization(RUNTIME, "repository:app:pull") == "Bearer tok"


async def test_basic_is_answered_with_the_hosts_credentials():
    auth = authorizer(Credential(username="alice", password="wonderland"))
    assert auth.learn(RUNTIME, ['Basic realm="registry"'])
    assert await auth.authorization(RUNTIME, "repository:app:pull") == f"Basic {BASIC_PASSWORD}"


def test_basic_without_credentials_cannot_succeed_on_a_retry():
    assert not authorizer(None).learn(RUNTIME, ['Basic realm="registry"'])


def test_bearer_without_a_realm_falls_back_to_basic():
    credential = Credential(username="alice", password="wonderland")
    auth = authorizer(credential)
    assert auth.learn(RUNTIME, ['Bearer service="reg"', 'Basic realm="r"'])


@pytest.mark.parametrize("values", [[], ["Negotiate"], ['Bearer service="no-realm"'], ["???"]])
def test_a_challenge_proxyd_cannot_answer_gives_no_retry(values):
    auth = authorizer(Credential(username="alice", password="wonderland"))
    assert not auth.learn(RUNTIME, values)


async def test_a_host_never_challenged_gets_no_authorization():
    auth = authorizer(Credential(username="alice", password="wonderland"))
    assert await auth.authorization(RUNTIME, "repository:app:pull") is None


async def test_credentials_are_never_sent_to_a_host_they_do_not_belong_to():
    other = make_host("https://other.example", HostSettings(), is_mirror=False)
    auth = authorizer(Credential(username="alice", password="wonderland"))
    assert not auth.learn(other, ['Basic realm="other"'])
    assert await auth.authorization(other, "repository:app:pull") is None
