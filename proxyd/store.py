"""The content-addressed store on disk: blobs and manifests named by their digest,
and links recording which (namespace, repository) upstream confirmed holds each one.

This module is the one place that knows the layout: every path under the cache
directory is built here, from a validated `Digest`, repository name and host name,
and checked to stay inside the cache directory. Other modules ask by meaning.

Layout under the cache directory (`BlobStore.root`):
    blobs/<algorithm>/<hex>                                 verified content only
        written by `BlobWriter.persist` (`writer`, `put`); read by `path`, `size`,
        `use`, `read`; listed by `stored_blobs`; deleted by `remove`
    tmp/<random>                                            files being written
        downloads (`BlobWriter`), links about to be renamed (`link`) and the
        readiness probe (`probe_writable`); counted by `temporary_files`; emptied
        by `open` when the daemon starts
    links/<namespace>/<repository>/_blobs/<algorithm>/<hex>      empty file
    links/<namespace>/<repository>/_manifests/<algorithm>/<hex>  the media type
        written by `link`; read by `linked`; found by `repositories_holding`;
        listed by `walk_links`; deleted by `unlink` and `remove`
    small.sqlite (+ -wal, -shm)                             tag records, owned by
        proxyd.smallcache at `small_cache_path`

`<namespace>` is one component (a host name); `<repository>` may be several
(`team/app`). No component of a repository name starts with `_` (the name grammar),
so `_blobs` and `_manifests` always mark where a repository's name ends.

A file appears under `blobs/` only by an atomic rename after its digest was checked,
so a crash at any moment leaves at most a stray file in `tmp/`, removed when the
daemon starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from proxyd import decrypting, direct, splicing
from proxyd.errors import DigestMismatch
from proxyd.reference import DIGEST_HEX_LENGTHS, Digest

LinkKind = Literal["_blobs", "_manifests"]
_LINK_KINDS: dict[str, LinkKind] = {"_blobs": "_blobs", "_manifests": "_manifests"}
Buffer = bytes | bytearray | memoryview
TOUCH_EVERY = 60.0  # seconds between updates of a blob's last-use time
_IOV_MAX = 1024  # buffers one writev takes (Linux's IOV_MAX)
# From this many bytes a batch is hashed in a second thread while it is written: the
# hash and the copy into the page cache are the two slow halves of a cold download,
# and both release the GIL. Below it, the hand-over costs more than it saves.
HASH_ASIDE_FROM = 256 << 10
# The most of a spliced file the hash maps at once: mapped pages count in the RSS.
HASH_WINDOW = 1 << 20
_hashers: ThreadPoolExecutor | None = None


def _hasher_pool() -> ThreadPoolExecutor:
    """Threads that only hash: a job there never waits for another, so writers
    waiting for them cannot deadlock, however many downloads run."""
    global _hashers
    if _hashers is None:
        _hashers = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="proxyd-hash")
    return _hashers


@dataclass(frozen=True)
class StoredFile:
    """A stored blob as eviction sees it: its size and last use (the file's mtime)."""

    digest: Digest
    size: int
    last_used: float


@dataclass(frozen=True)
class Link:
    """One link: upstream confirmed that `namespace`/`repository` holds `digest`."""

    namespace: str
    repository: str
    kind: LinkKind
    digest: Digest


class BlobStore:
    def __init__(self, root: Path, *, direct_writes: bool = True) -> None:
        self.root = root.resolve()
        self.direct_writes = direct_writes  # big bodies with O_DIRECT (BlobWriter.receive)
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._links = self.root / "links"
        self._removals = 0
        self._blobs_dir = str(self._blobs)

    @property
    def removals(self) -> int:
        """How many removals (unlinks and evictions) this store made: whoever remembers
        hits in memory drops them when it moves."""
        return self._removals

    @property
    def small_cache_path(self) -> Path:
        """The SQLite file of the small-response cache, beside the blobs."""
        return self.root / "small.sqlite"

    def is_initialised(self) -> bool:
        """Whether a store was ever opened here (`proxyd cache` has nothing to read else)."""
        return self._blobs.is_dir()

    def open(self, *, clear_tmp: bool = True) -> None:
        """Create the layout and drop what an interrupted run left in `tmp/` (the
        daemon's part: `proxyd prefetch` runs beside a serving daemon and must not
        take its downloads in flight)."""
        for directory in (self._blobs, self._tmp, self._links):
            directory.mkdir(parents=True, exist_ok=True)
        if not clear_tmp:
            return
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def path(self, digest: Digest) -> Path:
        return Path(self._blob_file(digest))

    def _blob_file(self, digest: Digest) -> str:
        """The blob's file name, built as a string: this is on the way of every blob
        request, and pathlib's normalisation costs more than the stat itself."""
        if not (digest.algorithm.isalnum() and digest.hex.isalnum()):
            raise ValueError(f"digest {digest} would make an odd file name")
        return f"{self._blobs_dir}/{digest.algorithm}/{digest.hex}"

    def size(self, digest: Digest) -> int | None:
        """The stored size, or None when the digest is not stored."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def use(self, digest: Digest) -> int | None:
        """The stored size, or None; marks the blob used (its mtime, at most once a
        minute) so eviction keeps what is in demand."""
        path = self._blob_file(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        now = time.time()
        if now - st.st_mtime > TOUCH_EVERY:
            with contextlib.suppress(OSError):
                os.utime(path, (now, now))
        return st.st_size

    def read(self, digest: Digest) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def writer(self, digest: Digest) -> BlobWriter:
        return BlobWriter(self, digest)

    def put(self, digest: Digest, data: bytes) -> None:
        """Store small content (a manifest) after checking it."""
        with self.writer(digest) as writer:
            writer.write(data)
            writer.commit()

    def temporary_path(self, prefix: str) -> Path:
        """A new name in `tmp/`, on the same file system as the blobs (for a rename)."""
        return self._tmp / f"{prefix}-{secrets.token_hex(8)}"

    # -- the whole store: what eviction and `proxyd cache stats` read -------------------

    def stored_blobs(self) -> list[StoredFile]:
        """Every stored blob, with its size and last use; a file whose name is not a
        digest of its directory's algorithm (by length) is not one."""
        found = []
        for algorithm, length in DIGEST_HEX_LENGTHS.items():
            directory = self._blobs / algorithm
            if not directory.is_dir():
                continue
            with os.scandir(directory) as entries:
                for entry in entries:
                    if len(entry.name) != length or not entry.is_file(follow_symlinks=False):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        found.append(
                            StoredFile(Digest(algorithm, entry.name), st.st_size, st.st_mtime)
                        )
        return found

    def remove(self, digests: Iterable[Digest]) -> None:
        """Delete the blobs, then every link to them in one walk of `links/`; counted
        as one removal, after the files are gone, so no hit is remembered anew."""
        doomed = set(digests)
        for digest in doomed:
            with contextlib.suppress(FileNotFoundError):
                self.path(digest).unlink()
        if not doomed:
            return
        for path, link in self._walk_links():
            if link.digest in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._removals += 1

    def temporary_files(self) -> int:
        """How many files `tmp/` holds: downloads in progress, or left by a crash."""
        if not self._tmp.is_dir():
            return 0
        return sum(1 for _ in self._tmp.iterdir())

    def probe_writable(self) -> str | None:
        """None when a small file can be created (and removed) in `tmp/`, where every
        download starts; else what went wrong (for the readiness probe)."""
        probe = self.temporary_path(".readyz")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            return self._not_writable(exc)
        try:
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
        except OSError as exc:
            return self._not_writable(exc)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return None

    def _not_writable(self, exc: OSError) -> str:
        return f"cache directory {self._tmp} is not writable: {exc.strerror or exc}"

    # -- links: what upstream confirmed, per repository ---------------------------------

    def _link_path(self, namespace: str, repository: str, kind: LinkKind, digest: Digest) -> Path:
        return self._inside(
            self._links / namespace / repository / kind / digest.algorithm / digest.hex
        )

    def link(
        self,
        namespace: str,
        repository: str,
        digest: Digest,
        kind: LinkKind = "_blobs",
        media_type: str = "",
    ) -> None:
        path = self._link_path(namespace, repository, kind, digest)
        if path.exists() and (kind == "_blobs" or path.read_text() == media_type):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.temporary_path("link")
        tmp.write_text(media_type)
        os.replace(tmp, path)

    def unlink(
        self, namespace: str, repository: str, digest: Digest, kind: LinkKind = "_blobs"
    ) -> None:
        """Upstream no longer holds it (a delete went through): stop serving it here."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._link_path(namespace, repository, kind, digest).unlink()
        self._removals += 1

    def linked(
        self, namespace: str, repository: str, digest: Digest, kind: LinkKind = "_blobs"
    ) -> str | None:
        """The link's content ("" for blobs, the media type for manifests), or None."""
        try:
            return self._link_path(namespace, repository, kind, digest).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def repositories_holding(self, namespace: str, digest: Digest) -> Iterator[str]:
        """The repositories of `namespace` with a blob link to `digest` (a mount
        source), in no particular order."""
        directory = self._inside(self._links / namespace)
        for link in directory.glob(f"**/_blobs/{digest.algorithm}/{digest.hex}"):
            yield link.relative_to(directory).parent.parent.parent.as_posix()

    def walk_links(self) -> Iterator[Link]:
        """Every link of every kind, in one walk of `links/`."""
        for _path, link in self._walk_links():
            yield link

    def _walk_links(self) -> Iterator[tuple[str, Link]]:
        root = str(self._links)
        for directory, _subdirs, names in os.walk(root):
            kind_dir, algorithm = os.path.split(directory)
            holder, kind = os.path.split(kind_dir)
            length = DIGEST_HEX_LENGTHS.get(algorithm)
            if not names or length is None or kind not in _LINK_KINDS:
                continue
            namespace, _, repository = os.path.relpath(holder, root).partition(os.sep)
            for name in names:
                if len(name) == length:
                    link = Link(namespace, repository, _LINK_KINDS[kind], Digest(algorithm, name))
                    yield os.path.join(directory, name), link

    def _inside(self, path: Path) -> Path:
        """Defence in depth: names are validated upstream of here, but a path that
        would leave the cache directory is refused regardless."""
        resolved = Path(os.path.normpath(path))
        if not resolved.is_relative_to(self.root):
            raise ValueError(f"path {path} escapes the cache directory")
        return resolved


class _Landed:
    """How far a splice has filled the file, for the thread that hashes behind it."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._total = start
        self._ended = False
        self._complete = False
        self._changed = threading.Condition()

    def add(self, size: int) -> None:
        with self._changed:
            self._total += size
            self._changed.notify()

    def end(self, *, complete: bool) -> None:
        with self._changed:
            self._ended, self._complete = True, complete
            self._changed.notify()

    def beyond(self, done: int) -> int | None:
        """The file's length once it is past `done`; None when nothing more is to be
        hashed (the splice ended: complete and all hashed, or failed)."""
        with self._changed:
            while self._total <= done and not self._ended:
                self._changed.wait()
            if self._ended and (not self._complete or self._total <= done):
                return None
            return self._total


class BlobWriter:
    """Writes a temporary file while hashing it; `commit` renames it into place only
    when the digest matches. Leaving the `with` block without commit discards it.

    `commit` is `verify` then `persist`: a download releases its last byte to the
    clients once `verify` passed, and persists (fsync, rename) after. `append` writes
    and hashes a batch of buffers with one `writev`; the download runs it in a worker
    thread, one batch at a time (hashlib and writev release the GIL), while nothing
    else touches the writer."""

    def __init__(self, store: BlobStore, digest: Digest) -> None:
        self.store = store
        self.digest = digest
        self.temp_path = store.temporary_path(digest.hex[:16])
        # Unbuffered: readers of a download in flight pread this file as it grows.
        # Readable too: a spliced body is hashed from the file, mapped (`splice`).
        self._fd = os.open(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        self._hash = hashlib.new(digest.algorithm)
        self.written = 0
        self.verified = False
        self.committed = False

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, data: Buffer) -> None:
        self.append([data])

    def append(self, buffers: Sequence[Buffer]) -> int:
        """Write and hash `buffers` in order, at the end of the file; the byte count.
        A large batch is hashed in another thread while this one writes it; either way
        both are done when this returns, so the next batch hashes after this one."""
        views = [memoryview(b) for b in buffers]
        total = sum(v.nbytes for v in views)
        if total < HASH_ASIDE_FROM:
            self._write_all(views, total)
            self._update_hash(buffers)
        else:
            hashed = _hasher_pool().submit(self._update_hash, buffers)
            try:
                self._write_all(views, total)
            finally:
                wait_for([hashed])  # never leave the hash running behind a failed write
            hashed.result()
        self.written += total
        return total

    def splice(
        self,
        source: int,
        count: int,
        *,
        timeout: float,
        stop: splicing.Stop,
        moved: Callable[[int], None],
        tls: decrypting.TLSState | None = None,
    ) -> None:
        """Move `count` bytes from the socket `source` to the end of the file inside
        the kernel (`proxyd.splicing`, which says what it raises), or decrypt them
        into it with the connection's `tls` state (`proxyd.decrypting`), `moved(n)` after
        each move, while a hashing thread hashes them from the file as they land,
        mapped a window at a time. Both are done when this returns, as with `append`.
        Blocks: run it in a worker thread."""
        landed = _Landed(self.written)
        # A thread of its own: this hash waits for the splice, which no pooled hasher
        # may (a write-behind's batch waits for those).
        own = ThreadPoolExecutor(1, thread_name_prefix="proxyd-splice-hash")
        hashed = own.submit(self._hash_landed, landed)
        own.shutdown(wait=False)  # the thread ends with its one job

        def on_move(size: int) -> None:
            self.written += size
            landed.add(size)
            moved(size)

        try:
            if tls is None:
                splicing.splice_into(
                    source, self._fd, count, timeout=timeout, stop=stop, moved=on_move
                )
            else:
                decrypting.decrypt_into(
                    source, self._fd, count, tls=tls, timeout=timeout, stop=stop, moved=on_move
                )
        finally:
            landed.end(complete=self.written == landed.start + count)
            wait_for([hashed])  # never leave the hash reading a file about to close
        hashed.result()

    def receive(
        self,
        source: int,
        head: bytes,
        count: int,
        *,
        timeout: float,
        stop: splicing.Stop,
        arrived: Callable[[memoryview], None],
        written: Callable[[int, Callable[[], None]], None],
        tls: decrypting.TLSState | None = None,
    ) -> bool:
        """Write `head` then `count` bytes from the socket `source` (decrypted with the
        connection's `tls` state, if given) into the empty file with O_DIRECT, hashing
        them (`proxyd.direct`, which says what it raises): `arrived(view)` with the
        bytes as they are read, `written(n, release)` as they reach the disk. False, with
        nothing read, where the store is told not to (`direct_writes`), the file
        system refuses O_DIRECT or a plain body is smaller than `direct.PLAIN_FROM`
        (then `splice`). Blocks: run it in a worker thread."""
        assert self.written == 0, "a body written with O_DIRECT starts the file"
        if not self.store.direct_writes:
            return False
        if tls is None and len(head) + count < direct.PLAIN_FROM:
            return False
        direct_fd = direct.open_direct(str(self.temp_path))
        if direct_fd is None:
            return False

        def on_write(size: int, release: Callable[[], None]) -> None:
            self.written += size
            written(size, release)

        try:
            poller = splicing.watch(source, stop)
            fill = direct.plain_reader(source) if tls is None else decrypting.reader(source, tls)
            direct.receive(
                fill,
                count,
                head=head,
                files=direct.Files(direct_fd, self._fd),
                hash=self._hash,
                poller=poller,
                stop=stop,
                timeout=timeout,
                arrived=arrived,
                written=on_write,
            )
        finally:
            os.close(direct_fd)
        return True

    def _hash_landed(self, landed: _Landed) -> None:
        """Hash what lands in the file, in order, until `landed` ends (all of it, if
        the splice completed)."""
        done = landed.start
        while (upto := landed.beyond(done)) is not None:
            end = min(upto, done + HASH_WINDOW)
            base = done - done % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(self._fd, end - base, prot=mmap.PROT_READ, offset=base) as mapped:
                view = memoryview(mapped)
                part = view[done - base :]
                try:
                    self._hash.update(part)
                finally:
                    part.release()
                    view.release()
            done = end

    def _write_all(self, views: list[memoryview], left: int) -> None:
        """Write `left` bytes, all of `views`, however short each writev falls."""
        while left:
            done = os.writev(self._fd, views[:_IOV_MAX])
            left -= done
            while done and views and done >= views[0].nbytes:  # drop what went out whole
                done -= views.pop(0).nbytes
            if done:  # a short write stopped inside this buffer
                views[0] = views[0][done:]

    def _update_hash(self, buffers: Sequence[Buffer]) -> None:
        for buffer in buffers:
            self._hash.update(buffer)

    def verify(self) -> None:
        """Check what was written against the digest; on a mismatch keep nothing and
        raise DigestMismatch."""
        actual = f"{self.digest.algorithm}:{self._hash.hexdigest()}"
        if actual != str(self.digest):
            self.close()
            raise DigestMismatch(str(self.digest), actual)
        self.verified = True

    def persist(self) -> None:
        """Put verified content in place: fsync, then the atomic rename."""
        if not self.verified:
            raise RuntimeError(f"{self.digest} is persisted before it was verified")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        final = self.store.path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, final)
        self.committed = True

    def commit(self, digest: Digest | None = None) -> None:
        """Verify and rename into place; raise DigestMismatch (and keep nothing) else.
        `digest` names the content when it was learnt only at the end (a chunked
        upload announces it with its last request)."""
        if digest is not None:
            self.digest = digest
        self.verify()
        self.persist()

    def close(self) -> None:
        """Discard unless committed; safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                self.temp_path.unlink()
