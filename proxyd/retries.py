"""When proxyd asks the same host again, and how long it waits first: containerd's
`retryRequest` and `doWithTransportRetries` (core/remotes/docker/resolver.go).

containerd's rules, kept: at most 5 attempts per host (`maxAttempts`); 408 and 429 are
asked again on any host; 500, 503 and 504 only on the last host of the chain (a mirror's
answer moves on to the next host instead) and not after the same status twice in a row;
a connection the server closed before answering (Go's io.EOF) only on the last host; a
405 to `HEAD` of a manifest is asked again as `GET` (registries that never implemented
HEAD there).

containerd also asks again after a timeout; proxyd does not: the host already had its
`read_timeout` (or `connect_timeout`) to answer, and asking again would multiply that
for the client. Where containerd asks again at once, proxyd waits: the answer's
`Retry-After` when it gives one, else a short backoff from containerd's 50 ms. And a
request's retries share one budget (`retry_max_wait`): a retry whose wait would end
past it is not made, so a client never waits on proxyd longer than it is likely to
wait at all; a longer `Retry-After` then stands as the answer (`proxyd.upstream`
remembers it per host and kind of request). Waits are the core clock's `sleep`, so
tests advance time instead. A body that can be sent once only (a streamed upload) is
never sent again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import structlog

from proxyd import clienterrors
from proxyd.breaker import parse_retry_after
from proxyd.clock import Clock
from proxyd.exchange import Body, Exchange, is_replayable
from proxyd.hosts import RegistryHost

log = structlog.get_logger("proxyd.upstream")

MAX_ATTEMPTS = 5  # containerd's maxAttempts
FIRST_BACKOFF = 0.05  # seconds; containerd's wait between transport retries
RETRIED_ON_ANY_HOST = (408, 429)
RETRIED_ON_THE_LAST_HOST = (500, 503, 504)


@dataclass(frozen=True)
class Ask:
    """One request as sent to one host."""

    host: RegistryHost
    method: str
    suffix: str  # below the repository: manifests/v1, blobs/sha256:...
    path: str
    headers: Iterable[tuple[str, str]]
    params: dict[str, str] | None
    scope: str
    data: Body


async def send(
    exchange: Exchange, ask: Ask, *, last: bool, deadline: float, clock: Clock
) -> aiohttp.ClientResponse:
    """The host's answer once it has been asked again as the rules say, each wait on
    `clock` and ending by `deadline` (its monotonic reading). Raises the transport
    failure that stood."""
    method = ask.method
    previous: int | None = None
    replayable = is_replayable(ask.data)
    attempt = 0
    while True:
        attempt += 1
        try:
            response = await exchange.send(
                ask.host, method, ask.path, ask.headers, ask.params, ask.scope, ask.data
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            wait = transport_retry(attempt, last_host=last, transient=_transient(exc))
            if not replayable or not await _waited(ask, wait, deadline, clock, _said(exc)):
                raise
            continue
        status = response.status
        if replayable and attempt < MAX_ATTEMPTS and again_as_get(method, ask.suffix, status):
            response.release()
            method = "GET"
            continue
        wait = status_retry(
            status,
            previous=previous,
            attempt=attempt,
            last_host=last,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
        if not replayable or not _within(wait, deadline, clock):
            return response
        response.release()
        await _waited(ask, wait, deadline, clock, f"answered {status}")
        previous = status


def backoff(attempt: int) -> float:
    """The wait after the `attempt`-th attempt when the host named none: 50 ms, doubled
    each time (50, 100, 200, 400 ms: under a second for all of containerd's attempts)."""
    return FIRST_BACKOFF * 2.0 ** (attempt - 1)


def status_retry(
    status: int,
    *,
    previous: int | None,
    attempt: int,
    last_host: bool,
    retry_after: float | None,
) -> float | None:
    """Seconds to wait before asking again after `status` at `attempt` (`previous`:
    the host's status before it, to this request); None: the answer stands."""
    if attempt >= MAX_ATTEMPTS:
        return None
    if status in RETRIED_ON_THE_LAST_HOST:
        if not last_host or previous == status:
            return None
    elif status not in RETRIED_ON_ANY_HOST:
        return None
    return retry_after if retry_after is not None else backoff(attempt)


def transport_retry(attempt: int, *, last_host: bool, transient: bool) -> float | None:
    """Seconds to wait before asking again after a transport failure at `attempt`;
    None: the failure stands (a mirror's moves on to the next host)."""
    if not (last_host and transient) or attempt >= MAX_ATTEMPTS:
        return None
    return backoff(attempt)


def again_as_get(method: str, suffix: str, status: int) -> bool:
    """A 405 to `HEAD` of a manifest: the registry never implemented HEAD there."""
    return status == 405 and method == "HEAD" and suffix.startswith("manifests/")


def _within(wait: float | None, deadline: float, clock: Clock) -> bool:
    return wait is not None and clock.monotonic() + wait <= deadline


async def _waited(ask: Ask, wait: float | None, deadline: float, clock: Clock, why: str) -> bool:
    """Wait `wait` seconds before asking again, if the budget allows; whether it did."""
    if not _within(wait, deadline, clock):
        return False
    assert wait is not None
    log.info("upstream.retry", host=ask.host.host, path=ask.path, reason=why, wait_s=wait)
    await clock.sleep(wait)
    return True


def _transient(exc: BaseException) -> bool:
    """containerd's isTransientTransportErr but for timeouts: the server closing the
    connection before it answered (Go's io.EOF). A refused connection, a name that does
    not resolve, a TLS failure or a timeout will not pass by asking again at once."""
    return isinstance(exc, aiohttp.ServerDisconnectedError)


def _said(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else clienterrors.describe(exc)
