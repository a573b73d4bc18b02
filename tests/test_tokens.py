"""How long proxyd keeps a registry token: what the token server says, renewed early,
and bounded whatever it says (proxyd/auth.py `token_lifetime`)."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxyd.auth import DEFAULT_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME, token_lifetime
from tests.test_pull import behind_token_server, upstream_config


@pytest.mark.parametrize(("expires_in", "kept"), [(300, 290), (3600, 3590), (12, 6), (1, 0.5)])
def test_a_token_is_kept_for_its_lifetime_less_ten_seconds_or_half_of_it(expires_in, kept):
    assert token_lifetime(expires_in) == kept


@pytest.mark.parametrize(
    "expires_in", [None, "300", True, 0, -5, math.nan, -math.inf, [300], {"s": 300}]
)
def test_no_positive_number_is_the_default_lifetime(expires_in):
    assert token_lifetime(expires_in) == token_lifetime(DEFAULT_TOKEN_LIFETIME)


@pytest.mark.parametrize("expires_in", [10**400, math.inf, 1e300, MAX_TOKEN_LIFETIME + 1])
def test_no_token_is_kept_longer_than_the_maximum(expires_in):
    assert token_lifetime(expires_in) == token_lifetime(MAX_TOKEN_LIFETIME)


@given(st.one_of(st.integers(), st.floats(), st.none(), st.text(max_size=5)))
@example(5e-324)  # the smallest float: halved, 0 (found by hypothesis)
def test_every_lifetime_is_a_finite_positive_number_of_seconds(expires_in):
    kept = token_lifetime(expires_in)
    assert isinstance(kept, float) and 0 < kept <= MAX_TOKEN_LIFETIME


@pytest.mark.parametrize(
    "expires_in",
    [pytest.param(10**400, id="401 digits"), math.inf, math.nan, -5, "300", None],
)
async def test_whatever_a_token_server_says_of_a_lifetime_a_pull_goes_through(
    make_proxyd, start_fake, expires_in
):
    _upstream, tokens, server, image = await behind_token_server(start_fake)
    tokens.expires_in = expires_in
    proxyd = await make_proxyd(upstream_config(server))
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert (await proxyd.get(f"/v2/team/app/blobs/{image.layer}")).status == 200
    assert tokens.issued == 1  # kept for the next request
