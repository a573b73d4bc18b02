"""The retry rules, read against containerd's `retryRequest` and
`doWithTransportRetries` (core/remotes/docker/resolver.go), as pure functions: which
answer is asked again of the same host, and how long proxyd waits first."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.retries import MAX_ATTEMPTS, again_as_get, backoff, status_retry, transport_retry


def retried(status: int, *, last_host: bool, previous: int | None = None) -> bool:
    wait = status_retry(status, previous=previous, attempt=1, last_host=last_host, retry_after=None)
    return wait is not None


@pytest.mark.parametrize("status", [408, 429])
@pytest.mark.parametrize("last_host", [True, False])
def test_408_and_429_are_asked_again_of_any_host(status, last_host):
    assert retried(status, last_host=last_host)


@pytest.mark.parametrize("status", [500, 503, 504])
def test_500_503_504_are_asked_again_of_the_last_host_only(status):
    assert retried(status, last_host=True)
    assert not retried(status, last_host=False)


@pytest.mark.parametrize("status", [500, 503, 504])
def test_the_same_5xx_twice_in_a_row_is_not_asked_a_third_time(status):
    assert not retried(status, last_host=True, previous=status)
    other = 500 if status != 500 else 503
    assert retried(status, last_host=True, previous=other)


@given(st.integers(100, 599).filter(lambda s: s not in (408, 429, 500, 503, 504)))
def test_no_other_status_is_asked_again(status):
    assert not retried(status, last_host=True)


@given(st.integers(1, 20), st.sampled_from([408, 429, 500, 503, 504]))
def test_a_host_is_asked_five_times_at_most(attempt, status):
    wait = status_retry(status, previous=None, attempt=attempt, last_host=True, retry_after=None)
    assert (wait is not None) == (attempt < MAX_ATTEMPTS)


def test_a_retry_after_is_the_wait_and_without_one_the_wait_doubles_from_50_ms():
    assert status_retry(429, previous=None, attempt=1, last_host=False, retry_after=7.0) == 7.0
    assert [backoff(n) for n in range(1, MAX_ATTEMPTS)] == [0.05, 0.1, 0.2, 0.4]
    assert status_retry(503, previous=None, attempt=3, last_host=True, retry_after=None) == 0.2


def test_a_dropped_connection_is_asked_again_on_the_last_host_only():
    assert transport_retry(1, last_host=True, transient=True) == 0.05
    assert transport_retry(1, last_host=False, transient=True) is None
    assert transport_retry(1, last_host=True, transient=False) is None
    assert transport_retry(MAX_ATTEMPTS, last_host=True, transient=True) is None


def test_only_a_405_to_head_of_a_manifest_is_asked_again_as_get():
    assert again_as_get("HEAD", "manifests/v1", 405)
    assert not again_as_get("GET", "manifests/v1", 405)
    assert not again_as_get("HEAD", "blobs/sha256:" + "0" * 64, 405)
    assert not again_as_get("HEAD", "manifests/v1", 404)
