"""Eviction keeps the store within its limits, least recently used first, and never
takes what was used a moment ago."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest

from proxyd.evict import GRACE, LOW_WATER, PRUNE_EVERY, Evictor, Plan, apply, plan
from proxyd.reference import Digest
from proxyd.smallcache import SmallCache
from proxyd.store import BlobStore, StoredFile
from tests.conftest import FakeClock, host, origin, until, until_stored
from tests.fakes import FakeRegistry, make_image
from tests.peers.redisserver import RedisServer

NOW = 1_000_000.0


def stored(name: str, size: int, idle: float) -> StoredFile:
    return StoredFile(Digest("sha256", hashlib.sha256(name.encode()).hexdigest()), size, NOW - idle)


def test_without_limits_nothing_is_removed():
    files = [stored("a", 10, 10_000), stored("b", 10, 20_000)]
    assert plan(files, max_size=None, max_age=None, now=NOW).remove == []


def test_least_recently_used_go_first_until_the_rest_fits():
    old, older, new = stored("old", 40, 5_000), stored("older", 40, 9_000), stored("new", 40, 1_000)
    chosen = plan([new, old, older], max_size=50, max_age=None, now=NOW)
    assert chosen.remove == [older, old]
    assert chosen.freed == 80
    assert chosen.total == 120


def test_a_store_over_its_limit_is_brought_to_nine_tenths_of_it():
    """So that a full cache scans its tree once per tenth of its size that arrives,
    not for every new blob."""
    files = [stored(str(i), 10, 10_000 + i) for i in range(10)]  # 100 bytes, [9] oldest
    chosen = plan(files, max_size=95, max_age=None, now=NOW)
    assert chosen.remove == [files[9], files[8]]
    assert chosen.total - chosen.freed <= 95 * LOW_WATER


def test_a_store_within_its_limit_loses_nothing_to_the_low_water_mark():
    files = [stored(str(i), 10, 10_000 + i) for i in range(10)]
    assert plan(files, max_size=100, max_age=None, now=NOW).remove == []


def test_blobs_unused_longer_than_max_age_go_whatever_the_size():
    stale, fresh = stored("stale", 1, 8 * 86400), stored("fresh", 1, 3600)
    assert plan([stale, fresh], max_size=None, max_age=7 * 86400, now=NOW).remove == [stale]


def test_a_blob_used_within_the_grace_period_is_never_removed():
    busy = stored("busy", 1000, GRACE / 2)
    assert plan([busy], max_size=1, max_age=1, now=NOW).remove == []


def put(store: BlobStore, data: bytes, idle: float) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    store.put(digest, data)
    when = NOW - idle
    os.utime(store.path(digest), (when, when))
    return digest


def test_apply_removes_the_blobs_and_their_links(tmp_path: Path):
    store = BlobStore(tmp_path)
    store.open()
    gone = put(store, b"gone" * 100, idle=10_000)
    kept = put(store, b"kept" * 100, idle=100)
    for digest in (gone, kept):
        store.link("registry.example", "team/app", digest)
        store.link("registry.example", "team/other", digest, "_manifests", "application/json")
    files = store.stored_blobs()
    assert {f.digest for f in files} == {gone, kept}
    apply(store, plan(files, max_size=500, max_age=None, now=NOW))
    assert store.size(gone) is None and store.size(kept) == 400
    assert store.linked("registry.example", "team/app", gone) is None
    assert store.linked("registry.example", "team/other", gone, "_manifests") is None
    assert store.linked("registry.example", "team/app", kept) == ""


def test_serving_a_blob_marks_it_used(tmp_path: Path):
    store = BlobStore(tmp_path)
    store.open()
    digest = put(store, b"x" * 10, idle=10_000)
    assert store.use(digest) == 10
    [file] = store.stored_blobs()
    assert file.last_used > NOW


async def test_each_evicted_blob_is_told_to_whoever_listens(tmp_path: Path):
    """In a fleet the directory hears of it, and sends no peer here for the blob."""
    store = BlobStore(tmp_path)
    store.open()
    gone = put(store, b"z" * 10, idle=10_000)
    told: list[Digest] = []
    evictor = Evictor(store, max_size=0, max_age=None)

    async def removed(digest: Digest) -> None:
        told.append(digest)

    evictor.on_removed = removed
    await evictor.run_once()

    assert told == [gone]
    assert store.size(gone) is None


def test_a_dry_run_removes_nothing(tmp_path: Path):
    store = BlobStore(tmp_path)
    store.open()
    digest = put(store, b"y" * 10, idle=10_000)
    chosen = Evictor(store, max_size=0, max_age=None).collect(dry_run=True)
    assert [f.digest for f in chosen.remove] == [digest]
    assert store.size(digest) == 10


async def test_a_store_over_its_size_limit_evicts_in_the_background(
    make_proxyd, start_fake, cache_dir: Path
):
    upstream = FakeRegistry()
    first = upstream.add(make_image("team/one", layer=b"1" * 50_000))
    second = upstream.add(make_image("team/two", layer=b"2" * 50_000))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        "\n".join(
            [
                f'default_namespace = "{host(server)}"',
                "[cache]",
                "max_size = 60000",
                f'[namespaces."{host(server)}"]',
                f'server = "{origin(server)}"',
            ]
        )
    )
    store = BlobStore(cache_dir)
    assert await (await proxyd.get(f"/v2/team/one/blobs/{first.layer}")).read()
    old = NOW - 10_000
    os.utime(await until_stored(cache_dir, first.layer), (old, old))
    assert await (await proxyd.get(f"/v2/team/two/blobs/{second.layer}")).read()
    await until(lambda: store.size(Digest.parse(first.layer)) is None)
    assert store.size(Digest.parse(first.layer)) is None
    assert store.size(Digest.parse(second.layer)) == 50_000


def seeded_store(cache_dir: Path) -> tuple[BlobStore, Digest, Digest]:
    store = BlobStore(cache_dir)
    store.open()
    old = put(store, b"o" * 3000, idle=NOW - time.time() + 40 * 86400)  # 40 days unused
    new = put(store, b"n" * 1000, idle=NOW - time.time())  # used just now
    store.link("registry.example", "team/app", old)
    store.link("registry.example", "team/app", new)
    return store, old, new


def test_cache_gc_dry_run_lists_without_removing(tmp_path: Path, capsys):
    from proxyd.cli import main

    store, old, new = seeded_store(tmp_path / "cache")
    config = tmp_path / "proxyd.toml"
    config.write_text('[cache]\nmax_age = "P30D"\n')
    assert (
        main(["cache", "gc", "--dry-run", "--config", str(config), "--cache-dir", str(store.root)])
        == 0
    )
    out = capsys.readouterr().out
    assert f"would remove {old}" in out
    assert str(new) not in out
    assert store.size(old) == 3000

    assert main(["cache", "gc", "--config", str(config), "--cache-dir", str(store.root)]) == 0
    assert store.size(old) is None and store.size(new) == 1000
    assert store.linked("registry.example", "team/app", old) is None


def test_cache_stats_shows_size_entries_and_top_repositories(tmp_path: Path, capsys):
    from proxyd.cli import main

    store, _, _ = seeded_store(tmp_path / "cache")
    assert main(["cache", "stats", "--cache-dir", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "blobs:           2" in out
    assert "3.9 KiB" in out
    assert "registry.example/team/app" in out


def test_the_hit_ratio_counts_what_the_store_answered():
    from proxyd.inventory import hit_ratio
    from proxyd.metrics import Metrics

    metrics = Metrics()
    assert hit_ratio(metrics.render().decode()) is None
    metrics.cache.labels("blob", "hit").inc(6)
    metrics.cache.labels("tag", "stale").inc(1)
    metrics.cache.labels("tag", "revalidated").inc(1)
    metrics.cache.labels("blob", "miss").inc(2)
    assert hit_ratio(metrics.render().decode()) == (0.8, 10)


# -- the small-response cache, pruned with max_age -----------------------------------------

DAY = 86400.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def fill(small: SmallCache, clock: Clock) -> None:
    """One record stored 40 days ago and one stored now."""
    clock.now = NOW - 40 * DAY
    await small.put("tag:old", {"digest": "sha256:" + "a" * 64})
    clock.now = NOW
    await small.put("tag:new", {"digest": "sha256:" + "b" * 64})


async def test_records_older_than_max_age_and_damaged_ones_are_pruned_sqlite(tmp_path: Path):
    clock = Clock(NOW)
    small = SmallCache.sqlite(tmp_path / "small.sqlite", clock=clock)
    try:
        await fill(small, clock)
        await small.get("tag:new")  # the table exists before the damaged row goes in
        with contextlib.closing(sqlite3.connect(tmp_path / "small.sqlite")) as db:
            db.execute("INSERT INTO small_responses VALUES ('tag:damaged', x'6e6f74')")
            db.commit()
        assert await small.prune(NOW - 30 * DAY) == 2  # the old one and the damaged one
        assert await small.get("tag:old") is None
        assert (await small.get("tag:new")) is not None
        assert await small.prune(NOW - 30 * DAY) == 0
    finally:
        await small.close()


async def test_records_older_than_max_age_and_damaged_ones_are_pruned_redis(tmp_path: Path):
    with RedisServer(tmp_path / "redis") as server:
        clock = Clock(NOW)
        small = SmallCache.redis(server.url, clock=clock)
        try:
            await fill(small, clock)
            assert server.command("HSET", "proxyd:small_responses", "tag:damaged", "not") == ":1"
            assert await small.prune(NOW - 30 * DAY) == 2
            assert await small.get("tag:old") is None
            assert (await small.get("tag:new")) is not None
        finally:
            await small.close()


async def test_the_evictor_prunes_the_small_cache_only_with_max_age(tmp_path: Path):
    store = BlobStore(tmp_path / "cache")
    store.open()
    small = SmallCache.sqlite(tmp_path / "small.sqlite", clock=lambda: time.time() - 40 * DAY)
    try:
        await small.put("tag:old", {"digest": "sha256:" + "a" * 64})
        unbounded = Evictor(store, max_size=None, max_age=None, small=small)
        assert await unbounded.prune_small() == 0
        bounded = Evictor(store, max_size=None, max_age=timedelta(days=30), small=small)
        assert await bounded.prune_small() == 1
    finally:
        await small.close()


class CountedEvictor(Evictor):
    """An evictor that counts its passes and the prunings of its small cache."""

    def __init__(self, store: BlobStore, small: SmallCache, clock: FakeClock) -> None:
        super().__init__(
            store,
            max_size=None,
            max_age=timedelta(days=30),
            interval=0.01,
            small=small,
            clock=clock,
        )
        self.passes = 0
        self.prunes: list[float] = []

        async def counted(older_than: float) -> int:
            self.prunes.append(older_than)
            return 0

        small.prune = counted  # type: ignore[method-assign]

    async def run_once(self, *, dry_run: bool = False) -> Plan:
        self.passes += 1
        return await super().run_once(dry_run=dry_run)


async def test_the_small_cache_is_pruned_once_an_hour_not_at_every_pass(tmp_path: Path):
    """Pruning reads the whole small cache; eviction passes come every few minutes."""
    store = BlobStore(tmp_path / "cache")
    store.open()
    small = SmallCache.sqlite(tmp_path / "small.sqlite")
    evictor = CountedEvictor(store, small, FakeClock())
    prunes = evictor.prunes
    evictor.start()
    try:
        await until(lambda: evictor.passes >= 20)  # a score of eviction passes
    finally:
        await evictor.stop()
        await small.close()
    assert len(prunes) == 1


async def test_an_hour_after_the_last_pruning_the_next_pass_prunes_again(tmp_path: Path):
    store = BlobStore(tmp_path / "cache")
    store.open()
    small = SmallCache.sqlite(tmp_path / "small.sqlite")
    clock = FakeClock()
    evictor = CountedEvictor(store, small, clock)
    evictor.start()
    try:
        await until(lambda: evictor.passes >= 2)
        clock.advance(PRUNE_EVERY - 1)
        passes = evictor.passes
        await until(lambda: evictor.passes >= passes + 2)
        assert len(evictor.prunes) == 1
        clock.advance(1)
        await until(lambda: len(evictor.prunes) == 2)
    finally:
        await evictor.stop()
        await small.close()
    assert evictor.prunes[1] - evictor.prunes[0] == pytest.approx(PRUNE_EVERY)  # 30 days before


def test_a_blob_is_removed_once_the_clock_passes_its_max_age(tmp_path: Path):
    store = BlobStore(tmp_path)
    store.open()
    clock = FakeClock()
    digest = put(store, b"a" * 10, idle=NOW - clock.time())  # used just now
    evictor = Evictor(store, max_size=None, max_age=timedelta(days=30), clock=clock)
    clock.advance(30 * DAY - 1)
    assert evictor.collect().remove == []
    clock.advance(2)
    assert [f.digest for f in evictor.collect().remove] == [digest]
    assert store.size(digest) is None
