"""The store answers by meaning (who holds a blob, what is stored, what links exist) and
keeps the layout of the cache directory to itself; it counts its own removals."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from proxyd.reference import Digest
from proxyd.store import BlobStore, Link

NS = "registry.example"


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def opened(root: Path) -> BlobStore:
    store = BlobStore(root)
    store.open()
    return store


def test_the_repositories_holding_a_blob_include_nested_names_and_no_other_namespace(
    tmp_path: Path,
):
    store = opened(tmp_path)
    layer, other = digest_of(b"layer"), digest_of(b"other")
    store.link(NS, "app", layer)
    store.link(NS, "a/b/c", layer)
    store.link("elsewhere.example", "team/app", layer)
    store.link(NS, "team/other", other)
    assert sorted(store.repositories_holding(NS, layer)) == ["a/b/c", "app"]
    assert list(store.repositories_holding("unknown.example", layer)) == []


def test_a_manifest_link_does_not_make_a_repository_hold_a_blob(tmp_path: Path):
    store = opened(tmp_path)
    manifest = digest_of(b"{}")
    store.link(NS, "team/app", manifest, "_manifests", "application/json")
    assert list(store.repositories_holding(NS, manifest)) == []


def test_removing_a_blob_removes_its_links_of_both_kinds_and_counts_one_removal(
    tmp_path: Path,
):
    store = opened(tmp_path)
    gone, also_gone, kept = digest_of(b"gone"), digest_of(b"also gone"), digest_of(b"kept")
    for digest, data in ((gone, b"gone"), (also_gone, b"also gone"), (kept, b"kept")):
        store.put(digest, data)
        store.link(NS, "team/app", digest)
        store.link(NS, "a/b/c", digest, "_manifests", "application/json")
    before = store.removals

    store.remove([gone, also_gone])

    assert store.removals == before + 1
    for digest in (gone, also_gone):
        assert store.size(digest) is None
        assert store.linked(NS, "team/app", digest) is None
        assert store.linked(NS, "a/b/c", digest, "_manifests") is None
    assert store.size(kept) == 4
    assert store.linked(NS, "team/app", kept) == ""
    assert store.linked(NS, "a/b/c", kept, "_manifests") == "application/json"


def test_removing_nothing_counts_no_removal(tmp_path: Path):
    store = opened(tmp_path)
    store.remove([])
    assert store.removals == 0


def test_an_unlink_counts_one_removal_and_nobody_else_can_count(tmp_path: Path):
    store = opened(tmp_path)
    store.unlink(NS, "team/app", digest_of(b"never linked"))
    assert store.removals == 1
    with pytest.raises(AttributeError):
        store.removals = 0  # type: ignore[misc]


def test_the_scan_of_stored_blobs_skips_files_that_are_not_digests(tmp_path: Path):
    store = opened(tmp_path)
    blob = digest_of(b"blob")
    store.put(blob, b"blob")
    sha256 = store.root / "blobs" / "sha256"
    (sha256 / "short").write_bytes(b"not a digest")
    (sha256 / ("c" * 64 + ".partial")).write_bytes(b"not a digest either")
    (sha256 / ("d" * 64)).mkdir()  # a directory, whatever its name
    os.symlink(sha256 / blob.hex, sha256 / ("e" * 64))  # a link to a blob is no blob
    (store.root / "blobs" / "md5").mkdir()
    (store.root / "blobs" / "md5" / ("f" * 32)).write_bytes(b"an algorithm proxyd lacks")

    [stored] = store.stored_blobs()
    assert (stored.digest, stored.size) == (blob, 4)


def test_the_walk_of_links_names_each_repository_digest_and_kind(tmp_path: Path):
    store = opened(tmp_path)
    layer, manifest = digest_of(b"layer"), digest_of(b"{}")
    store.link(NS, "a/b/c", layer)
    store.link(NS, "app", manifest, "_manifests", "application/json")
    store.link("elsewhere.example", "team/app", layer)
    assert sorted(store.walk_links(), key=str) == sorted(
        [
            Link(NS, "a/b/c", "_blobs", layer),
            Link(NS, "app", "_manifests", manifest),
            Link("elsewhere.example", "team/app", "_blobs", layer),
        ],
        key=str,
    )


def test_files_in_progress_are_counted_until_the_daemon_clears_them(tmp_path: Path):
    store = opened(tmp_path)
    writer = store.writer(digest_of(b"data"))
    writer.write(b"da")
    assert store.temporary_files() == 1
    writer.close()
    assert store.temporary_files() == 0
    store.temporary_path("left-over").write_bytes(b"")
    opened(tmp_path)  # what the daemon does when it starts
    assert store.temporary_files() == 0


def test_a_directory_never_opened_holds_no_store(tmp_path: Path):
    store = BlobStore(tmp_path / "cache")
    assert not store.is_initialised()
    assert store.temporary_files() == 0
    assert store.stored_blobs() == []
    store.open()
    assert store.is_initialised()
    assert store.small_cache_path.parent == store.root


def test_the_probe_of_a_writable_store_leaves_nothing_behind(tmp_path: Path):
    store = opened(tmp_path)
    assert store.probe_writable() is None
    assert store.temporary_files() == 0


def test_the_probe_names_the_directory_that_cannot_take_a_file(tmp_path: Path):
    store = opened(tmp_path)
    (store.root / "tmp").rmdir()
    (store.root / "tmp").write_text("not a directory")
    problem = store.probe_writable()
    assert problem is not None
    assert f"{store.root / 'tmp'} is not writable" in problem
