"""The two sizes of a run: the full benchmark and the CI smoke.

The smoke takes the same code path with tiny sizes and one repetition; it proves
every workload still runs, not how fast anything is.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    name: str
    layer_sizes: tuple[int, ...]  # bytes, one image layer each
    blob_size: int  # the cold blob of the TTFB and crowd workloads
    rss_sizes: tuple[int, int]  # the small and the large blob of the memory workload
    reps: int
    pull_reps: int  # the pulls: a pull's spread here is as wide as the differences sought
    ttfb_reps: int  # the cold TTFB: a few ms, each sample 2-3x from the next
    rss_reps: int
    slow_rate: float  # bytes/s of the slow upstream (TTFB)
    crowd_rate: float  # bytes/s per connection of the crowd upstream
    crowd_clients: int
    concurrency: int  # manifest hits
    load_seconds: float
    tag_ttl: float  # proxyd's, in the tag workload: its first round must fit in it
    big_sizes: tuple[int, ...]  # the big cold blobs (bigblobs.py): the smallest, for RSS
    big_reps: int
    deadline: float  # seconds the whole run may take before it stops itself
    fleet_nodes: int  # nodes pulling one image at once (the fleet workload)
    fleet_layer_sizes: tuple[int, ...]  # bytes, the fleet's image's layers
    fleet_rate: float  # bytes/s of the link all of them share to the upstream
    fleet_few_nodes: int  # the smaller fleet on the same link: how the ratio moves with nodes

    @property
    def image_size(self) -> int:
        return sum(self.layer_sizes)

    def pull_timeout(self) -> float:
        return 60 + self.image_size / (20 * MIB)

    def slow_timeout(self) -> float:
        """Long enough for a proxy that buffers the whole blob before the first byte."""
        return 2 * self.blob_size / self.slow_rate + 20

    def crowd_timeout(self) -> float:
        return 4 * self.blob_size / self.crowd_rate + 60

    def fleet_timeout(self) -> float:
        """Long enough for every node fetching the whole image over the shared link
        twice (distribution's proxy does), with room to spare: two CPUs run all nodes."""
        return 4 * self.fleet_nodes * sum(self.fleet_layer_sizes) / self.fleet_rate + 120


FULL = Profile(
    name="full",
    layer_sizes=(1 * MIB, 16 * MIB, 64 * MIB),
    blob_size=64 * MIB,
    rss_sizes=(256 * MIB, 1024 * MIB),
    reps=5,
    pull_reps=11,
    ttfb_reps=31,
    rss_reps=3,
    slow_rate=4 * MIB,
    crowd_rate=16 * MIB,
    crowd_clients=50,
    concurrency=32,
    load_seconds=5.0,
    tag_ttl=60.0,  # proxyd's default
    big_sizes=(256 * MIB, 1024 * MIB, 4096 * MIB),
    big_reps=3,
    deadline=3600.0,
    fleet_nodes=16,
    fleet_layer_sizes=(1 * MIB, 16 * MIB, 64 * MIB, 256 * MIB),
    fleet_rate=32 * MIB,
    fleet_few_nodes=4,
)

SMOKE = Profile(
    name="smoke",
    layer_sizes=(1 * MIB, 2 * MIB, 4 * MIB),
    blob_size=8 * MIB,
    rss_sizes=(8 * MIB, 32 * MIB),
    reps=1,
    pull_reps=1,
    ttfb_reps=1,
    rss_reps=1,
    slow_rate=4 * MIB,
    crowd_rate=16 * MIB,
    crowd_clients=50,
    concurrency=32,
    load_seconds=2.0,
    tag_ttl=20.0,
    big_sizes=(16 * MIB,),
    big_reps=1,
    deadline=170.0,
    fleet_nodes=3,
    fleet_layer_sizes=(MIB // 4, 1 * MIB, 2 * MIB),
    fleet_rate=64 * MIB,
    fleet_few_nodes=2,
)

PROFILES = {p.name: p for p in (FULL, SMOKE)}
