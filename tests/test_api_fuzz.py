"""A bounded fuzz of the running app: odd paths, queries, methods and headers.

Whatever a client sends, proxyd answers with an OCI error rather than a 500, and
nothing it writes lands outside the cache directory's own folders. Upstream is a
fake registry on a local port (so some requests really fetch and store content),
and every other configured namespace points at a closed port, so nothing outside
this machine is ever contacted."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from proxyd.log import OUTPUT, configure
from tests.conftest import FakeClock, host, oci_code, origin, until, until_stored
from tests.fakes import FakeImage, FakeRegistry, make_image

IMAGE = make_image()
CLOSED = "http://127.0.0.1:9"  # the discard port: connection refused, at once
CACHE_FOLDERS = {"blobs", "tmp", "links"}


@dataclass
class Running:
    client: Any
    upstream_host: str
    cache_dir: Path
    root: Path  # everything the test may write lives here
    config_file: Path


@pytest.fixture
async def running(make_proxyd, start_fake, cache_dir, tmp_path) -> Running:
    upstream = FakeRegistry()
    upstream.add(IMAGE)
    server = await start_fake(upstream)
    client = await make_proxyd(
        "\n".join(
            [
                f'default_namespace = "{host(server)}"',
                f'[namespaces."{host(server)}"]',
                f'server = "{origin(server)}"',
                '[namespaces."docker.io"]',
                f'server = "{CLOSED}"',
                '[namespaces."closed.example"]',
                f'server = "{CLOSED}"',
                '[namespaces."closed.example".host."http://127.0.0.1:9/mirror"]',
            ]
        )
    )
    for path in (f"/v2/team/app/manifests/{IMAGE.tag}", f"/v2/team/app/blobs/{IMAGE.layer}"):
        response = await client.get(path)  # warm the store: Range and If-* meet real files
        assert response.status == 200
        await response.read()
    await until_stored(cache_dir, IMAGE.layer)
    return Running(client, host(server), cache_dir, tmp_path, tmp_path / "proxyd.toml")


# -- what is sent ---------------------------------------------------------------------------


def pieces(image: FakeImage) -> list[str]:
    return [
        "team",
        "app",
        "library",
        "manifests",
        "blobs",
        "uploads",
        "tags",
        "list",
        "referrers",
        "_catalog",
        "v1",
        "latest",
        "..",
        ".",
        "",
        "%2e%2e",
        "%2E%2e",
        ".%2e",
        "%2F",
        "..%2F..",
        "%00",
        "%ff",
        "%C0%AE%C0%AE",  # an overlong "..", invalid UTF-8
        "%252e%252e",  # a double-encoded ".."
        "docker.io",
        "closed.example",
        "localhost",
        "ghcr.io",
        "Team",
        "a..b",
        image.digest,
        image.layer,
        image.config,
        "sha256:" + "0" * 64,
        "sha256:" + "A" * 64,
        "sha512:" + "0" * 128,
        "md5:" + "0" * 32,
        "sha256:..",
    ]


def segment(upstream_host: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([*pieces(IMAGE), upstream_host]),
        st.text(max_size=12).map(lambda s: quote(s, safe="")),
        st.text(alphabet="abc.-_:%/2e", max_size=8),
    )


@st.composite
def requests(draw: st.DrawFn, upstream_host: str) -> dict[str, Any]:
    shape = draw(st.sampled_from(["real", "shaped", "free"]))
    if shape == "real":  # content the fake upstream has (and the store, once fetched)
        name = draw(st.sampled_from([IMAGE.repository, f"{upstream_host}/{IMAGE.repository}"]))
        path = draw(
            st.sampled_from(
                [
                    f"/v2/{name}/blobs/{IMAGE.layer}",
                    f"/v2/{name}/blobs/{IMAGE.config}",
                    f"/v2/{name}/manifests/{IMAGE.tag}",
                    f"/v2/{name}/manifests/{IMAGE.digest}",
                    f"/v2/{name}/tags/list",
                ]
            )
        )
    elif shape == "shaped":  # shaped like the API, with odd parts
        name = draw(
            st.one_of(
                st.sampled_from(
                    [
                        IMAGE.repository,
                        f"{upstream_host}/{IMAGE.repository}",
                        "library/ubuntu",
                        "ubuntu",
                        "docker.io/library/ubuntu",
                        "closed.example/app",
                        "ghcr.io/org/app",
                        "localhost/app",
                    ]
                ),
                st.lists(segment(upstream_host), min_size=1, max_size=4).map("/".join),
            )
        )
        endpoint = draw(
            st.sampled_from(["manifests", "blobs", "tags/list", "blobs/uploads", "referrers"])
        )
        reference = draw(
            st.one_of(
                st.sampled_from([IMAGE.tag, IMAGE.digest, IMAGE.layer, IMAGE.config]),
                segment(upstream_host),
            )
        )
        path = f"/v2/{name}/{endpoint}/{reference if endpoint != 'tags/list' else ''}"
        path = path.rstrip("/")
    else:  # anything at all
        segments = draw(st.lists(segment(upstream_host), min_size=0, max_size=7))
        prefix = draw(st.sampled_from(["/v2/", "/v2/", "/", "/v2", "//v2/", "/v2/./"]))
        path = prefix + "/".join(segments)
    query = draw(
        st.one_of(
            st.just(""),
            st.sampled_from(
                [
                    "ns=docker.io",
                    "ns=closed.example",
                    f"ns={upstream_host}",
                    "ns=..",
                    "ns=../../etc",
                    "ns=ghcr.io",
                    "ns=",
                    "n=1&last=v0",
                    "n=-1",
                    "n=abc",
                ]
            ),
            st.text(max_size=20).map(lambda s: "ns=" + quote(s, safe="")),
            st.text(alphabet="=&%;ns.x", max_size=12),
        )
    )
    header_value = st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
    )
    headers = draw(
        st.dictionaries(
            st.sampled_from(
                [
                    "Accept",
                    "Range",
                    "If-Range",
                    "If-None-Match",
                    "If-Match",
                    "If-Modified-Since",
                    "If-Unmodified-Since",
                    "X-Request-Id",
                    "Authorization",
                    "Accept-Encoding",
                ]
            ),
            st.one_of(
                header_value,
                st.sampled_from(
                    [
                        "bytes=0-0",
                        "bytes=10-19",
                        "bytes=-5",
                        "bytes=5-",
                        "bytes=99999999-",
                        "bytes=5-1",
                        "bytes=0-1,3-4",
                        "bytes=",
                        "items=0-1",
                        f'"{IMAGE.layer}"',
                        "*",
                        "application/vnd.oci.image.index.v1+json",
                        "Mon, 01 Jan 2001 00:00:00 GMT",
                        "gzip, br",
                    ]
                ),
            ),
            max_size=3,
        )
    )
    method = draw(
        st.sampled_from(["GET"] * 6 + ["HEAD"] * 3 + ["PUT", "POST", "PATCH", "DELETE", "OPTIONS"])
    )
    return {"method": method, "path": path, "query": query, "headers": headers}


# -- what must hold -------------------------------------------------------------------------

SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_:\[\]-][A-Za-z0-9_.:\[\]-]*")
LINK_FILE = re.compile(
    r"links/[^/]+/[a-z0-9._/-]+/_(?:blobs|manifests)/(?:sha256/[0-9a-f]{64}|sha512/[0-9a-f]{128})"
)
BLOB_FILE = re.compile(r"blobs/(?:sha256/[0-9a-f]{64}|sha512/[0-9a-f]{128})")


SMALL_CACHE_FILE = re.compile(r"small\.sqlite(-journal|-wal|-shm)?")


async def tmp_drained(run: Running) -> None:
    """A download renames its file into blobs/ just after the last byte went out: let
    one that a request started finish (store_violations reports what stays)."""
    tmp = run.cache_dir / "tmp"
    with contextlib.suppress(AssertionError):  # what stays is reported, not raised here
        await until(lambda: not tmp.exists() or not any(tmp.iterdir()), within=2)


def store_violations(run: Running) -> list[str]:
    """Anything under tmp_path that is not the config file or the store's own layout:
    files only as blobs/<alg>/<hex> or links/<ns>/<repo>/_kind/<alg>/<hex>, no name
    that starts with a dot, tmp/ empty once the request is answered."""
    found = []
    for path in run.root.rglob("*"):
        if path == run.config_file or path == run.cache_dir:
            continue
        if not path.is_relative_to(run.cache_dir):
            found.append(f"outside the cache directory: {path}")
            continue
        relative = path.relative_to(run.cache_dir)
        if SMALL_CACHE_FILE.fullmatch(relative.as_posix()):
            continue  # the small-response cache (tags, tag lists), a SQLite database
        if relative.parts[0] not in CACHE_FOLDERS:
            found.append(f"outside blobs/, tmp/, links/: {relative}")
        elif not all(SAFE_COMPONENT.fullmatch(part) for part in relative.parts):
            found.append(f"odd path component: {relative}")
        elif relative.parts[0] == "tmp" and len(relative.parts) > 1:
            found.append(f"left in tmp/: {relative}")
        elif path.is_file() and not (
            BLOB_FILE.fullmatch(relative.as_posix()) or LINK_FILE.fullmatch(relative.as_posix())
        ):
            found.append(f"not a blob or a link: {relative}")
    return found


async def send(run: Running, case: dict[str, Any]) -> tuple[int, CIMultiDict[str], bytes]:
    """Send the path exactly as drawn: no client-side normalisation of dot segments."""
    url = run.client.make_url("/")
    query = f"?{case['query']}" if case["query"] else ""
    raw = URL(f"{url.scheme}://{url.host}:{url.port}{case['path']}{query}", encoded=True)
    async with run.client.session.request(
        case["method"], raw, headers=case["headers"], allow_redirects=False
    ) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_fuzzed_requests_get_oci_errors_and_never_write_outside_the_store(running, data):
    case = data.draw(requests(running.upstream_host), label="request")
    status, headers, body = await send(running, case)

    assert status < 500 or status in (502, 503, 504), (case, status, body)
    if status >= 400 and case["method"] == "GET":
        assert headers.get("Content-Type", "").startswith("application/json"), (case, status)
        error = json.loads(body)["errors"][0]
        assert isinstance(error["code"], str) and error["code"], (case, body)
        assert headers.get("Docker-Distribution-API-Version") == "registry/2.0", case
    if case["method"] == "HEAD":
        assert body == b"", case
    await tmp_drained(running)
    assert store_violations(running) == [], case


async def test_the_fuzzed_app_really_stores_content_under_the_cache_folders(running):
    """The walk is only meaningful if proxyd writes: the warmed store has the blob."""
    status, headers, body = await send(running, blob_request())
    assert (status, headers["X-Proxyd-Cache"]) == (200, "hit")
    assert body == IMAGE.blobs[IMAGE.layer]
    stored = [
        p
        for p in running.cache_dir.rglob("*")
        if p.is_file() and not SMALL_CACHE_FILE.fullmatch(p.name)
    ]
    assert {p.relative_to(running.cache_dir).parts[0] for p in stored} == {"blobs", "links"}
    assert store_violations(running) == []


# -- stored blobs: conditions and ranges are judged against the digest ETag ------------


def blob_request(**headers: str) -> dict[str, Any]:
    return {
        "method": "GET",
        "path": f"/v2/team/app/blobs/{IMAGE.layer}",
        "query": "",
        "headers": headers,
    }


async def test_a_stored_blob_advertises_its_digest_as_etag(running):
    _, headers, _ = await send(running, blob_request())
    assert headers["ETag"] == f'"{IMAGE.layer}"'


async def test_a_stored_blob_matches_if_match_with_its_own_etag(running):
    status, _, body = await send(running, blob_request(**{"If-Match": f'"{IMAGE.layer}"'}))
    assert status == 200
    assert body == IMAGE.blobs[IMAGE.layer]


async def test_a_stored_blob_answers_if_none_match_with_its_own_etag_with_304(running):
    status, headers, body = await send(
        running, blob_request(**{"If-None-Match": f'"{IMAGE.layer}"'})
    )
    assert status == 304
    assert headers["ETag"] == f'"{IMAGE.layer}"'
    assert body == b""


async def test_an_unsatisfiable_range_on_a_stored_blob_is_an_oci_code(running):
    status, headers, body = await send(running, blob_request(Range="bytes=99999999-"))
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(IMAGE.blobs[IMAGE.layer])}"
    assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"


async def test_a_range_of_thousands_of_digits_is_judged_not_an_internal_error(running):
    huge = "9" * 5000  # past the 4,300 digits Python's int() reads
    status, headers, body = await send(running, blob_request(Range=f"bytes={huge}-"))
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(IMAGE.blobs[IMAGE.layer])}"
    assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
    status, _, body = await send(running, blob_request(Range=f"bytes=0-{huge}"))
    assert status == 206
    assert body == IMAGE.blobs[IMAGE.layer]


async def test_a_range_in_an_unknown_unit_is_ignored(running):
    status, _, body = await send(running, blob_request(Range="items=0-1"))
    assert status == 200
    assert body == IMAGE.blobs[IMAGE.layer]


# -- an upstream that answers oddly ---------------------------------------------------------

MANIFEST_BODY = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST_BODY).hexdigest()


async def odd_upstream(
    make_proxyd: Any, aiohttp_server: Any, status: int, headers: dict[str, str], body: bytes
) -> Any:
    """proxyd in front of an upstream that gives every API request the same answer."""

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/v2/":
            return web.json_response({})
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, headers=headers, body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app, host="127.0.0.1")
    return await make_proxyd(
        f'default_namespace = "{host(server)}"\n'
        f'[namespaces."{host(server)}"]\nserver = "{origin(server)}"\n',
        clock=FakeClock(),  # a 429's or 5xx's retry waits on it, not on the test
    )


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{", id="not-json"),
        pytest.param(
            b"[]",
            id="array",
        ),
        pytest.param(
            b"null",
            id="null",
        ),
    ],
)
async def test_a_tag_list_upstream_mangled_is_unavailable_not_an_internal_error(
    make_proxyd, aiohttp_server, body
):
    proxyd = await odd_upstream(
        make_proxyd, aiohttp_server, 200, {"Content-Type": "application/json"}, body
    )
    response = await proxyd.get("/v2/team/app/tags/list")
    assert response.status == 502
    assert await oci_code(response) == "UNAVAILABLE"


@pytest.mark.parametrize("announced", ["sha256:zz", "md5:" + "0" * 32, "garbage"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_malformed_digest_announced_upstream_is_unavailable_not_the_clients_fault(
    make_proxyd, aiohttp_server, announced, method
):
    proxyd = await odd_upstream(
        make_proxyd,
        aiohttp_server,
        200,
        {"Content-Type": "application/json", "Docker-Content-Digest": announced},
        MANIFEST_BODY,
    )
    response = await proxyd.request(method, "/v2/team/app/manifests/v1")
    assert response.status == 502


async def test_a_manifest_that_does_not_match_its_announced_digest_is_refused(
    make_proxyd, aiohttp_server
):
    proxyd = await odd_upstream(
        make_proxyd,
        aiohttp_server,
        200,
        {"Content-Type": "application/json", "Docker-Content-Digest": "sha256:" + "0" * 64},
        MANIFEST_BODY,
    )
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 502
    assert await oci_code(response) == "DIGEST_INVALID"


async def test_a_manifest_without_announced_digest_is_named_by_its_sha256(
    make_proxyd, aiohttp_server
):
    proxyd = await odd_upstream(make_proxyd, aiohttp_server, 200, {}, MANIFEST_BODY)
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert response.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected", "code"),
    [
        (404, {}, b"<html>not found</html>", 404, "MANIFEST_UNKNOWN"),
        (404, {}, b'{"errors": "not a list"}', 404, "MANIFEST_UNKNOWN"),
        (404, {}, b'{"errors": [{"code": "NAME_UNKNOWN"}]}', 404, "NAME_UNKNOWN"),
        (401, {}, b"", 401, "UNAUTHORIZED"),
        (401, {"WWW-Authenticate": 'Bearer realm="not a url"'}, b"", 502, "UNAVAILABLE"),
        (403, {}, b"", 403, "DENIED"),
        (429, {"Retry-After": "7"}, b"", 429, "TOOMANYREQUESTS"),
        pytest.param(
            429,
            {"Retry-After": "\u00b2"},
            b"",
            429,
            "TOOMANYREQUESTS",
            id="retry-after-superscript",
        ),
        pytest.param(
            429, {"Retry-After": "9" * 5000}, b"", 429, "TOOMANYREQUESTS", id="retry-after-huge"
        ),
        (500, {}, b"boom", 502, "UNAVAILABLE"),
        (302, {"Location": "/v2/team/app/manifests/v1"}, b"", 502, "UNAVAILABLE"),
        pytest.param(
            302,
            {"Location": "http://[bad"},
            b"",
            502,
            "UNAVAILABLE",
            id="redirect-to-malformed-url",
        ),
        (302, {"Location": "file:///etc/passwd"}, b"", 502, "UNAVAILABLE"),
        (302, {"Location": "http://127.0.0.1:99999/x"}, b"", 502, "UNAVAILABLE"),
        (200, {"Content-Type": ";;;"}, b"[1]", 200, None),
    ],
)
async def test_whatever_upstream_answers_the_client_gets_an_oci_answer(
    make_proxyd, aiohttp_server, status, headers, body, expected, code
):
    proxyd = await odd_upstream(make_proxyd, aiohttp_server, status, headers, body)
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == expected
    if code is not None:
        assert await oci_code(response) == code


# -- the log of a fuzz run: no traceback; requests refused before routing counted -----


@pytest.fixture
def json_log() -> Iterator[None]:
    """The log as `proxyd serve` writes it to a pipe: JSON lines on stderr. Loggers
    are not cached meanwhile, so later tests' capture_logs still sees every one."""
    root = logging.getLogger()
    handlers, level, json_access = root.handlers[:], root.level, OUTPUT.json_access
    configure("info", "json")
    structlog.configure(cache_logger_on_first_use=False)
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:], root.level, OUTPUT.json_access = handlers, level, json_access


def log_events(capfd: Any) -> list[dict[str, Any]]:
    """The log written since the last call: every line must be one JSON event."""
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    return [json.loads(line) for line in err.split("\n") if line]  # a path may hold U+2028


async def send_raw(run: Running, data: bytes) -> bytes:
    """What proxyd answers to `data` on a connection of its own, until it closes the
    connection or one second passes (a head it waits for more of)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", run.client.server.port)
    try:
        writer.write(data)
        await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(1):
                return await reader.read(1 << 16)
        return b""
    finally:
        writer.close()


WELL_FORMED_HEAD = b"GET /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: proxyd\r\nAccept: */*\r\n\r\n"
TRICKY_BYTES = st.sampled_from([b"\r", b"\n", b"\0", b"\t", b" ", b":", b"\x7f", b"\xff", b"\x16"])


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Bytes that are mostly not HTTP: a head with bytes changed anywhere before its
    blank line, or something else altogether (a TLS handshake, binary noise)."""
    if draw(st.booleans()):
        data = bytearray(WELL_FORMED_HEAD)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 5))
            if draw(st.booleans()):
                data[at : at + draw(st.integers(0, 1))] = draw(TRICKY_BYTES)
            else:
                del data[at]
        return bytes(data)
    start = draw(st.sampled_from([b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\0", b"\xff"]))
    return start + draw(st.binary(max_size=64))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_a_fuzz_run_logs_no_traceback_and_no_error(running, json_log, capfd, data):
    case = data.draw(requests(running.upstream_host), label="request")
    await send(running, case)
    raw = data.draw(raw_requests(), label="raw")
    await send_raw(running, raw)
    events = log_events(capfd)
    assert [e for e in events if "exception" in e or e["level"] in ("error", "critical")] == []


async def test_a_request_refused_before_routing_is_one_access_line_and_one_count(
    running, json_log, capfd
):
    log_events(capfd)
    answer = await send_raw(running, bytes.fromhex("16030100a5010000a10303") + bytes(32))
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert status_line.split(" ")[1] == "400"
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"

    events = log_events(capfd)
    (line,) = [e for e in events if e["logger"] == "proxyd.access"]
    assert [e for e in events if e["level"] != "info"] == []
    assert line["event"] == "request" and line["logger"] == "proxyd.access"
    assert (line["status"], line["method"], line["path"]) == (400, "UNKNOWN", None)
    assert line["rejected"] == "Received HTTPS traffic on an HTTP port"
    assert line["request_id"] == headers["x-request-id"]
    metrics = (await (await running.client.get("/metrics")).text()).splitlines()
    assert 'proxyd_requests_total{method="UNKNOWN",route="rejected",status="400"} 1.0' in metrics
