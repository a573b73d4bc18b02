"""A big cold blob is taken off the event loop by a worker thread: written to the file
with O_DIRECT and given to the clients from memory (tests/test_direct.py has the
thread's own tests), or, where the file system refuses O_DIRECT, spliced from a
plain-http socket into the file inside the kernel, hashed from the file and sent to
plain clients with sendfile (over TLS, decrypted into the file instead:
tests/test_decrypt.py). Either way the same answers and guarantees as the
write-behind's path: the tests taking `taken` run all four ways. `SPLICE_FROM` is
lowered here so that the 1 MiB layers of the fakes take that path; `spliced` and
`taken.counts` count the bodies taken off the loop, so each test shows it did."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxyd import decrypting, direct, splicing, store, upstream
from proxyd.download import Download, OnDisk
from proxyd.errors import DigestMismatch
from proxyd.pace import MinimumRate
from proxyd.reference import Digest
from proxyd.store import BlobStore
from proxyd.upstream import RawBody
from tests.conftest import host, origin, until, until_stored
from tests.fakes import FakeRegistry, make_image
from tests.test_decrypt import server_context
from tests.test_faults import config

LAYER = os.urandom(1 << 20)
READ_TIMEOUT = 0.3


def counted(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, *, refused: bool | None = None
) -> list[int]:
    """Bodies of any length are taken off the loop by `module.name` (`receive`,
    `splice_into`, `decrypt_into`); the list holds each one's byte count (what was
    left in the socket). Where that is not `direct.receive`, the file system refuses
    O_DIRECT, unless `refused` is False."""
    counts: list[int] = []
    real = getattr(module, name)

    def counting(source: Any, *args: Any, **kwargs: Any) -> None:
        counts.append(args[1] if module is splicing or module is decrypting else args[0])
        real(source, *args, **kwargs)

    monkeypatch.setattr(upstream, "SPLICE_FROM", 0)
    monkeypatch.setattr(direct, "PLAIN_FROM", 0)
    monkeypatch.setattr(module, name, counting)
    if refused if refused is not None else module is not direct:
        monkeypatch.setattr(direct, "open_direct", lambda path: None)
    return counts


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bodies of any length are spliced (no O_DIRECT); the list holds each splice's
    byte count."""
    return counted(monkeypatch, splicing, "splice_into")


def stored(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "blobs" / "sha256" / digest.split(":")[1]


@dataclass
class Taken:
    """proxyd in front of a fake (`proxyd(fake, read_timeout=None)`), over plain http
    or TLS, its big bodies written with O_DIRECT, or (a file system refusing it)
    spliced or decrypted into the page cache; `counts` holds each such body's byte
    count."""

    counts: list[int]
    proxyd: Callable[..., Awaitable[Any]]


TAKERS = {
    "plain http: O_DIRECT": (direct, "receive"),
    "TLS: O_DIRECT": (direct, "receive"),
    "plain http: spliced": (splicing, "splice_into"),
    "TLS: decrypted": (decrypting, "decrypt_into"),
}


@pytest.fixture(params=list(TAKERS))
def taken(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    aiohttp_server: Any,
    make_proxyd: Any,
    tmp_path: Path,
) -> Taken:
    over_tls = request.param.startswith("TLS")
    counts = counted(monkeypatch, *TAKERS[request.param])
    if over_tls:
        ca = trustme.CA()
        ca_pem = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_pem))

    async def start(fake: FakeRegistry, read_timeout: float | None = None) -> Any:
        context = server_context(ca) if over_tls else None
        server = await aiohttp_server(fake.app(), host="127.0.0.1", ssl=context)
        text = config(server, read_timeout=read_timeout)
        if over_tls:
            text = text.replace('server = "http://', 'server = "https://')
            text += f'\nca = "{ca_pem}"'
        return await make_proxyd(text)

    return Taken(counts, start)


async def test_a_cold_blob_taken_off_the_loop_is_served_whole_and_stored(
    taken: Taken, cache_dir: Path
):
    fake = FakeRegistry()
    image = fake.add(make_image(layer=LAYER))
    proxyd = await taken.proxyd(fake)

    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert response.status == 200
    assert await response.read() == LAYER
    assert len(taken.counts) == 1 and 0 < taken.counts[0] <= len(LAYER)  # past the head
    assert (await until_stored(cache_dir, image.layer)).read_bytes() == LAYER

    ranged = await proxyd.get(f"/v2/team/app/blobs/{image.layer}", headers={"Range": "bytes=5-9"})
    assert await ranged.read() == LAYER[5:10]


async def test_clients_joining_a_body_taken_off_the_loop_get_every_byte_once_verified(
    taken: Taken, cache_dir: Path
):
    fake = FakeRegistry(gate=asyncio.Event())  # the last byte waits for the test
    image = fake.add(make_image(layer=LAYER))
    proxyd = await taken.proxyd(fake)
    path = f"/v2/team/app/blobs/{image.layer}"

    first = await proxyd.get(path)
    await until(lambda: bool(taken.counts))
    whole, part = await proxyd.get(path), await proxyd.get(path, headers={"Range": "bytes=10-"})
    assert fake.gate is not None
    fake.gate.set()

    assert [await r.read() for r in (first, whole, part)] == [LAYER, LAYER, LAYER[10:]]
    assert len(fake.requests(f"/blobs/{image.layer}")) == 1
    await until_stored(cache_dir, image.layer)


async def test_a_corrupt_blob_taken_off_the_loop_is_cut_short_and_stores_nothing(
    taken: Taken, cache_dir: Path
):
    fake = FakeRegistry(corrupt=True)
    image = fake.add(make_image(layer=LAYER))
    proxyd = await taken.proxyd(fake)

    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert taken.counts
    assert not stored(cache_dir, image.layer).exists()
    await until(lambda: not any((cache_dir / "tmp").iterdir()))


async def test_a_body_taken_off_the_loop_that_breaks_off_is_cut_short_and_fetched_again(
    taken: Taken, cache_dir: Path
):
    fake = FakeRegistry(drop_after=len(LAYER) // 2)
    image = fake.add(make_image(layer=LAYER))
    proxyd = await taken.proxyd(fake)
    path = f"/v2/team/app/blobs/{image.layer}"

    response = await proxyd.get(path)
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert taken.counts
    assert not stored(cache_dir, image.layer).exists()

    fake.drop_after = None
    assert await (await proxyd.get(path)).read() == LAYER
    await until_stored(cache_dir, image.layer)


async def test_a_body_taken_off_the_loop_that_stalls_is_cut_by_the_read_timeout(
    taken: Taken, cache_dir: Path
):
    fake = FakeRegistry(gate=asyncio.Event())  # never set: the last byte never comes
    image = fake.add(make_image(layer=LAYER))
    proxyd = await taken.proxyd(fake, read_timeout=READ_TIMEOUT)

    started = time.monotonic()
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 10)
    assert taken.counts
    assert time.monotonic() - started < READ_TIMEOUT + 5
    assert not stored(cache_dir, image.layer).exists()
    await until(lambda: not any((cache_dir / "tmp").iterdir()))


async def test_small_bodies_are_read_by_the_loop(taken: Taken, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(upstream, "SPLICE_FROM", len(LAYER) + 1)
    fake = FakeRegistry()
    image = fake.add(make_image(layer=LAYER))
    proxyd = await taken.proxyd(fake)
    for digest, body in image.blobs.items():
        assert await (await proxyd.get(f"/v2/team/app/blobs/{digest}")).read() == body
    assert taken.counts == []


async def test_a_stalled_splice_holds_no_thread_that_other_downloads_wait_for(
    make_proxyd, start_fake, cache_dir: Path, spliced: list[int], monkeypatch: pytest.MonkeyPatch
):
    """A splice and the hash that follows it wait at the upstream's pace, in threads of
    their own: a download read by the loop meanwhile (past `MAX_SPLICES`) hashes its
    large batches in the shared hashing threads, and ends while the splice stalls."""
    monkeypatch.setattr(splicing, "MAX_SPLICES", 1)
    monkeypatch.setattr(store, "_hashers", ThreadPoolExecutor(1))  # one shared hasher
    stalled, other = FakeRegistry(gate=asyncio.Event()), FakeRegistry()
    first = stalled.add(make_image(layer=LAYER))
    second = other.add(make_image(layer=LAYER[::-1]))
    stalled_server, other_server = await start_fake(stalled), await start_fake(other)
    proxyd = await make_proxyd(
        "\n".join(
            [
                config(stalled_server),
                f'[namespaces."{host(other_server)}"]',
                f'server = "{origin(other_server)}"',
            ]
        )
    )

    waiting = await proxyd.get(f"/v2/team/app/blobs/{first.layer}")
    await until(lambda: bool(spliced))
    response = await proxyd.get(f"/v2/team/app/blobs/{second.layer}?ns={host(other_server)}")
    assert await asyncio.wait_for(response.read(), 10) == LAYER[::-1]
    assert len(spliced) == 1  # the second body was read by the loop

    assert stalled.gate is not None
    stalled.gate.set()
    assert await waiting.read() == LAYER


def test_a_splice_moves_the_count_and_reports_each_move(tmp_path: Path):
    ours, theirs = connected()
    data = os.urandom(3 << 20)
    target = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT)
    moves: list[int] = []
    stop = splicing.Stop()
    with ours, theirs:
        sender = threading.Thread(target=theirs.sendall, args=(data,))
        sender.start()
        splicing.splice_into(
            ours.fileno(), target, len(data), timeout=10, stop=stop, moved=moves.append
        )
        sender.join()
    os.close(target)
    stop.close()
    assert sum(moves) == len(data)
    assert max(moves) <= splicing.SPLICE_READ
    assert (tmp_path / "file").read_bytes() == data


@pytest.mark.parametrize("fault", ["closed", "silent", "stopped"])
def test_a_splice_ends_on_a_short_body_silence_or_its_stop(tmp_path: Path, fault: str):
    ours, theirs = connected()
    target = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT)
    stop = splicing.Stop()
    theirs.sendall(b"x" * 1000)
    if fault == "closed":
        theirs.close()
    if fault == "stopped":
        stop.set()
    expected = {
        "closed": ConnectionAbortedError,
        "silent": TimeoutError,
        "stopped": splicing.Stopped,
    }[fault]
    try:
        with pytest.raises(expected):
            splicing.splice_into(
                ours.fileno(), target, 2000, timeout=0.05, stop=stop, moved=lambda n: None
            )
    finally:
        ours.close()
        theirs.close()
        os.close(target)
        stop.close()
    assert (tmp_path / "file").read_bytes() == b"x" * 1000


def raw_body(sock: socket.socket, left: int, head: bytes = b"", timeout: float = 10) -> RawBody:
    return RawBody(sock.fileno(), head, left, timeout, MinimumRate(0, time.monotonic))


def open_download(tmp_path: Path, digest: str) -> Download:
    """A download of `digest` into a store under `tmp_path`, its file made."""
    blob_store = BlobStore(tmp_path)
    blob_store.open()
    download = Download(Digest.parse(digest), None)
    download.open(blob_store)
    return download


def connected() -> tuple[socket.socket, socket.socket]:
    """Two ends of a connection: ours non-blocking, as asyncio's sockets are."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


@pytest.fixture(params=["O_DIRECT", "spliced"])
def mover(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A download's body taken off the loop both ways: with O_DIRECT, or spliced (the
    file system refusing O_DIRECT)."""
    if request.param == "spliced":
        monkeypatch.setattr(direct, "open_direct", lambda path: None)
    else:
        monkeypatch.setattr(direct, "PLAIN_FROM", 0)
    return str(request.param)


async def test_a_taken_download_is_hashed_and_read_both_ways(tmp_path: Path, mover: str):
    """Readers on plain sockets take spans of the file (or bytes from memory, written
    with O_DIRECT); the others (TLS) its bytes. Both wait for the digest for the last
    byte."""
    download = open_download(tmp_path, "sha256:" + hashlib.sha256(LAYER).hexdigest())
    download.size = len(LAYER)
    ours, theirs = connected()

    async def read(spans: bool) -> bytes:
        got = bytearray()
        async for piece in download.pieces(spans=spans):
            if isinstance(piece, OnDisk):
                got += os.pread(piece.file.fileno(), piece.length, piece.offset)
            else:
                got += piece
        return bytes(got)

    readers = [asyncio.create_task(read(spans)) for spans in (True, False)]
    with ours, theirs:
        sending = asyncio.get_running_loop().run_in_executor(None, theirs.sendall, LAYER[100:])
        await download.splice(raw_body(ours, len(LAYER) - 100, head=LAYER[:100]))
        await sending
    assert download.written == len(LAYER)
    await asyncio.sleep(0)
    assert not any(r.done() for r in readers)  # the last byte waits for the digest
    await download.verify()
    assert [await r for r in readers] == [LAYER, LAYER]
    assert download.writer is not None
    download.writer.close()
    download.release()


async def test_a_taken_download_with_a_wrong_digest_keeps_nothing(tmp_path: Path, mover: str):
    download = open_download(tmp_path, "sha256:" + "0" * 64)
    ours, theirs = connected()
    with ours, theirs:
        theirs.sendall(LAYER[:4096])
        await download.splice(raw_body(ours, 4096))
    with pytest.raises(DigestMismatch):
        await download.verify()
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_a_cancelled_download_taken_off_the_loop_stops_at_once_and_lets_go_of_the_file(
    tmp_path: Path, mover: str
):
    download = open_download(tmp_path, "sha256:" + "0" * 64)
    ours, theirs = connected()
    with ours, theirs:
        splice = asyncio.create_task(download.splice(raw_body(ours, 4096, timeout=60)))
        theirs.sendall(b"x" * 1000)
        await until(lambda: download.received == 1000)  # then the thread polls for more
        splice.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(splice, 5)  # not the 60 s of the read timeout
    await download.discard()
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_with_direct_writes_off_big_bodies_go_through_the_page_cache(
    make_proxyd, start_fake, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """`[cache] direct_writes = false`: the operator keeps every blob in the page cache
    for its next reader; a body O_DIRECT would take (on a file system that takes it)
    is spliced instead."""
    spliced = counted(monkeypatch, splicing, "splice_into", refused=False)
    fake = FakeRegistry()
    image = fake.add(make_image(layer=LAYER))
    proxyd = await make_proxyd(config(await start_fake(fake)) + "\n[cache]\ndirect_writes = false")

    assert await (await proxyd.get(f"/v2/team/app/blobs/{image.layer}")).read() == LAYER
    assert len(spliced) == 1
    assert (await until_stored(cache_dir, image.layer)).read_bytes() == LAYER
