"""Manifests kept in memory after a hit (proxyd/memory.py): served without reading the
store for `recheck` seconds, bounded in bytes, and dropped when the store removes
anything; and fresh tag answers, remembered by digest for as long."""

from __future__ import annotations

import hashlib
from pathlib import Path

from proxyd.evict import Plan, apply
from proxyd.memory import ManifestMemory, TagMemory
from proxyd.reference import Digest
from proxyd.store import BlobStore, StoredFile

KEY = ("docker.io", "library/app", "sha256:" + "a" * 64)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hot_manifests(tmp_path: Path, max_bytes: int = 1000) -> tuple[ManifestMemory, Clock]:
    store = BlobStore(tmp_path)
    store.open()
    clock = Clock()
    return ManifestMemory(store, max_bytes, recheck=1.0, clock=clock), clock


def test_a_remembered_hit_is_served_until_its_recheck_is_due(tmp_path):
    hot, clock = hot_manifests(tmp_path)
    hot.put(KEY, "application/json", b"{}")
    clock.now += 0.9
    assert hot.get(KEY) is not None
    clock.now += 0.2
    assert hot.get(KEY) is None  # the store must be asked again


def test_memory_is_bounded_and_the_least_recently_used_goes_first(tmp_path):
    hot, _ = hot_manifests(tmp_path, max_bytes=250)
    keys = [("ns", "repo", f"sha256:{i}") for i in range(3)]
    hot.put(keys[0], "t", b"x" * 100)
    hot.put(keys[1], "t", b"x" * 100)
    hot.get(keys[0])
    hot.put(keys[2], "t", b"x" * 100)
    assert hot.get(keys[0]) is not None and hot.get(keys[2]) is not None
    assert hot.get(keys[1]) is None
    hot.put(("ns", "repo", "huge"), "t", b"x" * 251)
    assert hot.get(("ns", "repo", "huge")) is None


def test_an_unlink_in_the_store_drops_every_remembered_hit(tmp_path):
    hot, _ = hot_manifests(tmp_path)
    entry = hot.put(KEY, "application/json", b"{}")
    generation = hot.generation
    hot.store.unlink("docker.io", "library/app", Digest("sha256", "a" * 64), "_manifests")
    assert not hot.is_current(generation, entry.fresh_until)
    assert hot.get(KEY) is None


def test_an_eviction_drops_every_remembered_hit(tmp_path):
    hot, _ = hot_manifests(tmp_path)
    entry = hot.put(KEY, "application/json", b"{}")
    generation = hot.generation
    digest = Digest("sha256", hashlib.sha256(b"layer").hexdigest())
    hot.store.put(digest, b"layer")
    apply(hot.store, Plan(remove=[StoredFile(digest, 5, 0.0)], total=5, entries=1))
    assert not hot.is_current(generation, entry.fresh_until)
    assert hot.get(KEY) is None


def test_a_tag_is_remembered_for_a_second_and_never_past_its_freshness():
    clock = Clock()
    tags = TagMemory(recheck=1.0, clock=clock)
    tags.put("tag a", KEY[2], fresh_for=60)
    tags.put("tag b", KEY[2], fresh_for=0.3)
    tags.put("tag c", KEY[2], fresh_for=0)  # already old: not remembered
    assert tags.get("tag b") == (KEY[2], 100.3)  # the digest, and until when
    clock.now += 0.5
    assert (tags.get("tag a"), tags.get("tag b"), tags.get("tag c")) == (
        (KEY[2], 101.0),
        None,
        None,
    )
    clock.now += 0.6
    assert tags.get("tag a") is None


def test_remembered_tags_are_bounded_and_the_least_recently_used_goes_first():
    tags = TagMemory(max_entries=2, clock=Clock())
    tags.put("tag a", "sha256:a", fresh_for=60)
    tags.put("tag b", "sha256:b", fresh_for=60)
    assert tags.get("tag a") is not None
    tags.put("tag c", "sha256:c", fresh_for=60)
    assert [tags.get(key) is not None for key in ("tag a", "tag b", "tag c")] == [
        True,
        False,
        True,
    ]
    off = TagMemory(max_entries=0, clock=Clock())
    off.put("tag a", "sha256:a", fresh_for=60)
    assert off.get("tag a") is None
