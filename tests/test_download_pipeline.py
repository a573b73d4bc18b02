"""Cold content on its way through proxyd: a blob hashed and written behind the event
loop, released to the clients once verified, stored (fsync, rename) after that; a
manifest answered once checked, and stored after the answer."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from proxyd import store as store_module
from proxyd.download import Download, OnDisk
from proxyd.errors import UpstreamError
from proxyd.reference import Digest
from proxyd.server.keys import PULLER
from proxyd.store import BlobStore, BlobWriter, Buffer
from proxyd.writebehind import WriteBehind
from tests.conftest import host, oci_code, origin, until, until_logged, until_stored
from tests.fakes import FakeImage, FakeRegistry, make_image

LAYER = bytes(range(256)) * 4096  # 1 MiB


def config(server: object) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
        ]
    )


@pytest.fixture
def held_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The store's fsync waits until the test sets the event (a slow disk)."""
    release = threading.Event()
    real = os.fsync

    def fsync(fd: int) -> None:
        release.wait(30)
        real(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    yield release
    release.set()


async def one_image(make_proxyd: Any, start_fake: Any) -> tuple[Any, FakeRegistry, FakeImage, str]:
    """proxyd in front of an upstream with one image of a 1 MiB layer: (proxyd,
    upstream, the image, the upstream's namespace)."""
    upstream = FakeRegistry()
    image = upstream.add(make_image(layer=LAYER))
    server = await start_fake(upstream)
    return await make_proxyd(config(server)), upstream, image, host(server)


async def test_the_last_byte_goes_out_before_the_fsync_ends(
    make_proxyd, start_fake, cache_dir: Path, held_fsync: threading.Event
):
    proxyd, _, image, _ = await one_image(make_proxyd, start_fake)

    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await asyncio.wait_for(response.read(), 10) == LAYER  # while fsync is held
    assert not (cache_dir / "blobs" / "sha256" / image.layer.split(":")[1]).exists()

    held_fsync.set()
    await until_stored(cache_dir, image.layer)
    assert list((cache_dir / "tmp").iterdir()) == []


async def test_a_blob_sent_in_http_chunks_arrives_whole_and_is_stored(
    make_proxyd, start_fake, cache_dir: Path
):
    """No Content-Length, the body in many chunks of chunked transfer coding: the
    end of a chunk is no end of the body."""
    upstream = FakeRegistry(chunked_blobs=True, drip=(100_000, 0.0))
    image = upstream.add(make_image(layer=LAYER))
    proxyd = await make_proxyd(config(await start_fake(upstream)))

    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await asyncio.wait_for(response.read(), 10) == LAYER
    assert (await until_stored(cache_dir, image.layer)).read_bytes() == LAYER


async def test_a_request_between_verification_and_rename_joins_the_download(
    make_proxyd, start_fake, cache_dir: Path, held_fsync: threading.Event
):
    proxyd, upstream, image, _ = await one_image(make_proxyd, start_fake)
    first = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await asyncio.wait_for(first.read(), 10) == LAYER

    joined = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")  # not stored yet
    assert joined.headers["X-Proxyd-Cache"] == "hit"  # verified: no upstream byte awaited
    assert await asyncio.wait_for(joined.read(), 10) == LAYER
    ranged = await proxyd.get(f"/v2/team/app/blobs/{image.layer}", headers={"Range": "bytes=100-"})
    assert await asyncio.wait_for(ranged.read(), 10) == LAYER[100:]
    assert len(upstream.requests(f"/blobs/{image.layer}")) == 1

    held_fsync.set()
    await until_stored(cache_dir, image.layer)
    again = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert again.headers["X-Proxyd-Cache"] == "hit"
    assert len(upstream.requests(f"/blobs/{image.layer}")) == 1


async def test_a_failed_rename_after_the_release_keeps_nothing_and_is_logged(
    make_proxyd, start_fake, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    proxyd, upstream, image, _ = await one_image(make_proxyd, start_fake)
    real_replace = os.replace
    renamed = threading.Event()

    def replace(source: Any, target: Any) -> None:
        if "/blobs/" in str(target):  # links are renamed into place too: those may go
            renamed.set()
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(store_module.os, "replace", replace)
    with capture_logs() as events:
        response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
        assert await asyncio.wait_for(response.read(), 10) == LAYER  # verified: complete
        await until(lambda: any(e["event"] == "blob.not_stored" for e in events))

    failed = [e for e in events if e["event"] == "blob.not_stored"]
    assert len(failed) == 1 and "No space left" in failed[0]["error"]
    assert not any(e["event"] == "blob.stored" for e in events)
    assert list((cache_dir / "tmp").iterdir()) == []
    assert list((cache_dir / "blobs").rglob("*/*")) == []

    monkeypatch.setattr(store_module.os, "replace", real_replace)
    retry = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await retry.read() == LAYER
    assert len(upstream.requests(f"/blobs/{image.layer}")) == 2


async def test_the_temporary_file_is_made_while_upstream_is_asked(
    make_proxyd, start_fake, cache_dir: Path
):
    upstream = FakeRegistry(hang=True)  # it never answers: what is made, is made meanwhile
    image = upstream.add(make_image(layer=LAYER))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server) + "\nread_timeout = 1")
    request = asyncio.create_task(proxyd.get(f"/v2/team/app/blobs/{image.layer}"))
    await until(
        lambda: any((cache_dir / "tmp").iterdir()) and upstream.requests(f"/blobs/{image.layer}")
    )
    assert [p.name[:16] for p in (cache_dir / "tmp").iterdir()] == [image.layer[7:23]]

    response = await asyncio.wait_for(request, 10)
    assert response.status == 502  # the read timeout
    assert list((cache_dir / "tmp").iterdir()) == []


async def test_a_blob_request_that_fails_before_reaching_upstream_leaves_no_file(
    make_proxyd, start_fake, cache_dir: Path
):
    upstream = FakeRegistry()
    image = upstream.add(make_image(layer=LAYER))
    proxyd = await make_proxyd(config(await start_fake(upstream)), offline=True)
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert response.status == 503  # offline: refused at once, no upstream asked
    await until_logged(proxyd)
    for _ in range(5):  # turns of the loop after the failure: the file would be made there
        await asyncio.sleep(0)
    assert list((cache_dir / "tmp").iterdir()) == []
    assert upstream.seen == []


async def test_a_cold_blob_that_cannot_be_written_is_a_clean_error_and_leaves_nothing(
    make_proxyd, start_fake, cache_dir: Path
):
    proxyd, _, image, _ = await one_image(make_proxyd, start_fake)
    shutil.rmtree(cache_dir / "tmp")
    (cache_dir / "tmp").write_text("not a directory")

    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert response.status == 500
    assert await oci_code(response) == "UNKNOWN"

    (cache_dir / "tmp").unlink()
    (cache_dir / "tmp").mkdir()
    retry = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await retry.read() == LAYER
    await until_stored(cache_dir, image.layer)
    assert list((cache_dir / "tmp").iterdir()) == []


async def test_a_manifest_is_answered_before_it_is_stored_and_from_memory_until_then(
    make_proxyd, start_fake, held_fsync: threading.Event
):
    proxyd, upstream, image, ns = await one_image(make_proxyd, start_fake)
    store = proxyd.server.app[PULLER].store
    digest, path = Digest.parse(image.digest), f"/v2/team/app/manifests/{image.digest}"

    first = await asyncio.wait_for(proxyd.get(path), 10)  # while its fsync is held
    assert first.headers["X-Proxyd-Cache"] == "miss"
    assert await first.read() == image.manifest
    again = await asyncio.wait_for(proxyd.get(path), 10)
    assert again.headers["X-Proxyd-Cache"] == "hit"
    assert await again.read() == image.manifest
    assert len(upstream.requests(f"/manifests/{image.digest}")) == 1
    assert store.linked(ns, "team/app", digest, "_manifests") is None  # not yet

    held_fsync.set()
    await until(lambda: store.linked(ns, "team/app", digest, "_manifests") is not None)
    assert store.read(digest) == image.manifest
    assert store.linked(ns, "team/app", digest, "_manifests") == first.content_type


async def test_a_delete_while_a_manifest_is_stored_leaves_neither_link_nor_memory(
    make_proxyd, start_fake, held_fsync: threading.Event
):
    proxyd, upstream, image, ns = await one_image(make_proxyd, start_fake)
    puller = proxyd.server.app[PULLER]
    digest, path = Digest.parse(image.digest), f"/v2/team/app/manifests/{image.digest}"
    assert (await asyncio.wait_for(proxyd.get(path), 10)).status == 200

    puller.store.unlink(ns, "team/app", digest, "_manifests")  # as a DELETE does
    held_fsync.set()
    await asyncio.wait_for(puller.close(), 10)  # every store has ended
    assert puller.store.read(digest) == image.manifest  # content, but no link to it
    assert puller.store.linked(ns, "team/app", digest, "_manifests") is None
    again = await asyncio.wait_for(proxyd.get(path), 10)
    assert again.headers["X-Proxyd-Cache"] == "miss"  # not from memory: asked upstream
    assert len(upstream.requests(f"/manifests/{image.digest}")) == 2


async def test_a_manifest_that_cannot_be_stored_is_answered_and_fetched_again_later(
    make_proxyd, start_fake, monkeypatch: pytest.MonkeyPatch
):
    proxyd, upstream, image, ns = await one_image(make_proxyd, start_fake)
    puller = proxyd.server.app[PULLER]
    path = f"/v2/team/app/manifests/{image.digest}"

    def full_disk(digest: Digest, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(puller.store, "put", full_disk)
    with capture_logs() as events:
        first = await asyncio.wait_for(proxyd.get(path), 10)
        assert await first.read() == image.manifest  # the client's answer is whole
        await asyncio.wait_for(puller.close(), 10)  # every store has ended
    failed = [e for e in events if e["event"] == "manifest.not_stored"]
    assert len(failed) == 1 and "No space left" in failed[0]["error"]
    assert puller.store.linked(ns, "team/app", Digest.parse(image.digest), "_manifests") is None

    again = await asyncio.wait_for(proxyd.get(path), 10)
    assert again.headers["X-Proxyd-Cache"] == "miss"
    assert await again.read() == image.manifest
    assert len(upstream.requests(f"/manifests/{image.digest}")) == 2


class StalledWriter(BlobWriter):
    """A BlobWriter on a disk that stalls after the first write until the test lets
    it go on."""

    def __init__(self, store: BlobStore, digest: Digest) -> None:
        super().__init__(store, digest)
        self.go_on = threading.Event()
        self.batches: list[int] = []

    def append(self, buffers: Sequence[Buffer]) -> int:
        if self.batches:
            self.go_on.wait(30)
        self.batches.append(len(buffers))
        return super().append(buffers)


def on_a_stalling_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, *, size_known: bool = False
) -> tuple[Download, list[StalledWriter]]:
    """A download of `data`, open, whose disk stalls after its first write (the writer
    made is in the list)."""
    store = BlobStore(tmp_path)
    store.open()
    writers: list[StalledWriter] = []

    def stalled_writer(wanted: Digest) -> StalledWriter:
        writers.append(StalledWriter(store, wanted))
        return writers[-1]

    monkeypatch.setattr(store, "writer", stalled_writer)
    download = Download(Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()), target=None)
    if size_known:
        download.size = len(data)
    download.open(store)
    return download, writers


async def test_a_stalled_disk_stops_the_reading_at_the_high_water_mark(tmp_path: Path):
    store = BlobStore(tmp_path)
    store.open()
    chunk, chunks = 64 * 1024, 64  # 4 MiB through a 256 KiB high-water mark
    data = os.urandom(chunk * chunks)
    writer = StalledWriter(store, Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()))
    announced: list[int] = []
    pipe = WriteBehind(writer, announced.append, high_water=256 * 1024)
    fed = 0

    async def read_upstream() -> None:
        nonlocal fed
        for start in range(0, len(data), chunk):
            pipe.feed(data[start : start + chunk])
            fed += chunk
            await pipe.room()

    reader = asyncio.create_task(read_upstream())
    for _ in range(50):
        await asyncio.sleep(0)
    assert not reader.done()
    assert pipe.backlog <= pipe.high_water + chunk
    in_flight = pipe.high_water + chunk  # what was queued while the first chunk waited
    assert fed <= chunk + in_flight + pipe.high_water + chunk  # written, stalled, queued
    assert announced == [chunk]  # the first chunk, written on the loop; nothing after it

    writer.go_on.set()
    await asyncio.wait_for(reader, 10)
    await asyncio.wait_for(pipe.flush(), 10)
    assert announced[-1] == pipe.written == len(data)
    assert announced == sorted(announced)
    assert writer.batches[0] == 1  # the first chunk alone
    assert max(writer.batches) > 1  # later ones were batched while the disk stalled
    writer.verify()  # every byte hashed, in order
    writer.close()


class CountingWriter(BlobWriter):
    """A BlobWriter that records the bytes of each batch it is handed."""

    def __init__(self, store: BlobStore, digest: Digest) -> None:
        super().__init__(store, digest)
        self.batch_bytes: list[int] = []

    def append(self, buffers: Sequence[Buffer]) -> int:
        self.batch_bytes.append(sum(len(b) for b in buffers))
        return super().append(buffers)


async def test_small_chunks_go_to_the_disk_in_batches_and_the_flush_takes_the_rest(
    tmp_path: Path,
):
    """A thread hop per socket chunk was 12-20% of a fleet node's Python time: after
    the first chunk, the worker is handed nothing short of `min_batch` but the last
    batch, which `flush` hands over."""
    store = BlobStore(tmp_path)
    store.open()
    chunk, min_batch = 16 * 1024, 128 * 1024
    data = os.urandom(chunk * 45 + 100)  # the last batch is short of min_batch
    writer = CountingWriter(store, Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()))
    announced: list[int] = []
    pipe = WriteBehind(writer, announced.append, high_water=512 * 1024, min_batch=min_batch)
    for start in range(0, len(data), chunk):
        pipe.feed(data[start : start + chunk])
        await pipe.room()
        for _ in range(3):
            await asyncio.sleep(0)  # the worker is idle more often than not
    await asyncio.wait_for(pipe.flush(), 10)
    assert sum(writer.batch_bytes) == pipe.written == announced[-1] == len(data)
    first, *middle, last = writer.batch_bytes
    assert first == chunk  # the first chunk alone, on the loop
    assert middle and all(n >= min_batch for n in middle)
    assert last > 0  # whatever was left when the flush came
    assert len(writer.batch_bytes) <= 2 + len(data) // min_batch
    writer.verify()  # every byte hashed, in order
    writer.close()


async def test_a_caught_up_reader_gets_what_the_disk_has_not_taken_yet_but_the_last_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Readers do not wait for a slow disk: bytes still queued for it are served from
    memory. The last byte still waits for the digest."""
    chunk = 64 * 1024
    data = os.urandom(8 * chunk)
    download, writers = on_a_stalling_disk(tmp_path, monkeypatch, data)
    got = bytearray()

    async def read() -> None:
        async for part in download.chunks():
            got.extend(part)

    reader = asyncio.create_task(read())
    for start in range(0, len(data), chunk):
        await download.write(data[start : start + chunk])
    for _ in range(20):
        await asyncio.sleep(0)
    assert download.written == chunk  # the disk took the first chunk and stalled
    assert bytes(got) == data[:-1]

    writers[0].go_on.set()
    await asyncio.wait_for(download.verify(), 10)
    await asyncio.wait_for(reader, 10)
    assert bytes(got) == data
    writers[0].close()
    download.release()


async def test_a_reader_for_a_plain_socket_gets_spans_of_what_is_on_disk_and_memory_beyond(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A reader whose client takes sendfile is handed the bytes on disk as spans of
    the file, and what the disk has not taken yet from memory, as any reader; the
    last byte still waits for the digest."""
    chunk = 64 * 1024
    data = os.urandom(4 * chunk)
    download, writers = on_a_stalling_disk(tmp_path, monkeypatch, data, size_known=True)
    for start in range(0, len(data), chunk):
        await download.write(data[start : start + chunk])
    await until(lambda: download.written == chunk)  # the disk took the first and stalled
    got: list[tuple[str, bytes]] = []

    async def read() -> None:
        async for piece in download.pieces(spans=True):
            if isinstance(piece, OnDisk):
                got.append(("disk", os.pread(piece.file.fileno(), piece.length, piece.offset)))
            else:
                got.append(("memory", piece))

    reader = asyncio.create_task(read())
    await until(lambda: sum(len(part) for _, part in got) == len(data) - 1)
    assert [where for where, _ in got] == ["disk", "memory", "memory", "memory"]

    writers[0].go_on.set()
    await asyncio.wait_for(download.verify(), 10)
    await asyncio.wait_for(reader, 10)
    assert got[-1] == ("disk", data[-1:])
    assert b"".join(part for _, part in got) == data
    writers[0].close()
    download.release()


async def test_with_the_size_known_only_the_blobs_final_byte_waits_for_the_digest(
    tmp_path: Path,
):
    """A reader that keeps up gets each chunk whole, as it came from upstream: only
    the blob's final byte is held back, not the newest byte of every chunk."""
    store = BlobStore(tmp_path)
    store.open()
    chunk = 64 * 1024
    data = os.urandom(4 * chunk)
    download = Download(Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()), target=None)
    download.size = len(data)
    download.open(store)
    parts: list[bytes] = []

    async def read() -> None:
        async for part in download.chunks():
            parts.append(part)

    reader = asyncio.create_task(read())
    chunks = [data[start : start + chunk] for start in range(0, len(data), chunk)]
    for piece in chunks:
        await download.write(piece)
        for _ in range(5):
            await asyncio.sleep(0)
    assert parts == [*chunks[:-1], chunks[-1][:-1]]

    await asyncio.wait_for(download.verify(), 10)
    await asyncio.wait_for(reader, 10)
    assert parts[-1] == data[-1:]
    assert download.writer is not None
    download.writer.close()
    download.release()


async def test_a_request_waiting_for_upstream_has_the_first_chunk_before_the_disk_does(
    tmp_path: Path,
):
    """The first byte goes out at the loop's first turn after upstream answered; the
    first chunk's disk write comes after it, in the same turn."""
    store = BlobStore(tmp_path)
    store.open()
    data = os.urandom(256 * 1024)
    download = Download(Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()), target=None)
    download.size = len(data)
    download.open(store)
    on_disk_at_first_read: list[int] = []

    async def request() -> None:
        await download.answered()
        async for _ in download.chunks():
            assert download.writer is not None
            on_disk_at_first_read.append(os.path.getsize(download.writer.temp_path))
            return

    waiting = asyncio.create_task(request())
    await asyncio.sleep(0)  # the request waits for upstream's answer
    download.answer()
    await download.write(data[: 64 * 1024])  # upstream sent the head with a first chunk
    await asyncio.wait_for(waiting, 10)
    assert on_disk_at_first_read == [0]

    for start in range(64 * 1024, len(data), 64 * 1024):
        await download.write(data[start : start + 64 * 1024])
    await asyncio.wait_for(download.verify(), 10)
    assert download.written == len(data)
    assert download.writer is not None
    download.writer.close()


async def test_a_request_cancelled_while_waiting_for_upstream_leaves_the_download_alone():
    download = Download(Digest.parse("sha256:" + "0" * 64), target=None)
    first, second = (asyncio.create_task(download.answered()) for _ in range(2))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    download.answer()
    await asyncio.wait_for(second, 10)  # the other request goes on
    await download.answered()  # and so does any later one

    failed = Download(Digest.parse("sha256:" + "1" * 64), target=None)
    waiting = asyncio.create_task(failed.answered())
    await asyncio.sleep(0)
    failed.error = UpstreamError("upstream went away")
    failed.answer()
    with pytest.raises(UpstreamError, match="went away"):
        await asyncio.wait_for(waiting, 10)


def test_a_large_batch_is_hashed_beside_its_write_and_both_are_done_on_return(
    tmp_path: Path,
):
    store = BlobStore(tmp_path)
    store.open()
    buffers = [os.urandom(store_module.HASH_ASIDE_FROM) for _ in range(3)]
    data = b"".join(buffers)
    with store.writer(Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())) as writer:
        writer.append(buffers[:1])
        assert writer.append(buffers[1:]) == 2 * store_module.HASH_ASIDE_FROM
        assert writer.temp_path.read_bytes() == data
        writer.commit()  # the digest of every byte, in order
    assert store.path(writer.digest).read_bytes() == data


def test_a_failed_write_of_a_large_batch_raises_once_its_hash_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = BlobStore(tmp_path)
    store.open()
    hashed = threading.Event()
    real_hash = BlobWriter._update_hash

    def slow_hash(self: BlobWriter, buffers: Sequence[Buffer]) -> None:
        threading.Event().wait(0.05)  # still hashing when the write fails
        real_hash(self, buffers)
        hashed.set()

    def full_disk(fd: int, buffers: Sequence[Buffer]) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BlobWriter, "_update_hash", slow_hash)
    monkeypatch.setattr(store_module.os, "writev", full_disk)
    data = os.urandom(store_module.HASH_ASIDE_FROM)
    with store.writer(Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())) as writer:
        with pytest.raises(OSError, match="No space left"):
            writer.append([data])
        assert hashed.is_set()  # nothing of this writer runs on behind the caller
    assert list((tmp_path / "tmp").iterdir()) == []


# What a restart keeps by design (proxyd/download.py, `Download._reset`): the blob and
# repository it is for, its readers, the count of restarts, and what ends a download.
KEPT_ACROSS_RESTARTS = {"digest", "target", "generation", "_users", "_waiters", "stored", "error"}


async def test_a_restarted_download_holds_what_a_new_one_holds(tmp_path: Path):
    """Every field of a new download, whenever one is added, is as new after a
    restart, but those kept on purpose; and the download then takes the blob afresh."""
    store = BlobStore(tmp_path)
    store.open()
    data = os.urandom(3 * 64 * 1024)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    download = Download(digest, target=None)
    waiting = asyncio.create_task(download.answered())  # a request not answered yet
    download.size, download.host, download.peer = len(data), "peer:5000", "peer:5000"
    download.withhold = True
    download.open(store)
    download.answer()
    await download.write(b"wrong bytes")
    await waiting
    got = bytearray()

    async def read() -> None:
        async for part in download.chunks():
            got.extend(part)

    reader = asyncio.create_task(read())  # it has had no byte: it goes on after a restart
    await asyncio.sleep(0)
    await download.restart()

    new = Download(digest, target=None)
    changed = {
        name: (value, vars(download)[name])
        for name, value in vars(new).items()
        if name not in KEPT_ACROSS_RESTARTS and vars(download)[name] != value
    }
    assert changed == {}
    assert vars(download).keys() == vars(new).keys()
    assert download.generation == 1 and download._users == 2  # itself and the reader
    assert list((tmp_path / "tmp").iterdir()) == []  # the first attempt's file went

    download.size = len(data)
    download.open(store)
    download.answer()
    await download.write(data)
    await asyncio.wait_for(download.verify(), 10)
    await asyncio.wait_for(reader, 10)
    assert bytes(got) == data
    assert download.writer is not None
    download.writer.close()
    download.release()
