"""What the store holds, for `proxyd cache stats`: sizes, ages, and the repositories
whose blobs take the most room (from the links upstream confirmed)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from proxyd.store import BlobStore


@dataclass
class Inventory:
    entries: int = 0
    total_bytes: int = 0
    oldest_use: float | None = None
    newest_use: float | None = None
    temporary_files: int = 0
    repositories: Counter[str] = field(default_factory=Counter)  # bytes per ns/repo

    def top(self, count: int = 10) -> list[tuple[str, int]]:
        return self.repositories.most_common(count)


def take_inventory(store: BlobStore) -> Inventory:
    files = store.stored_blobs()
    sizes = {f.digest: f.size for f in files}
    result = Inventory(entries=len(files), total_bytes=sum(sizes.values()))
    if files:
        result.oldest_use = min(f.last_used for f in files)
        result.newest_use = max(f.last_used for f in files)
    result.temporary_files = store.temporary_files()
    for link in store.walk_links():
        size = sizes.get(link.digest)
        if size is not None:
            result.repositories[f"{link.namespace}/{link.repository}"] += size
    return result


def describe(inventory: Inventory, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    lines = [
        f"blobs:           {inventory.entries}",
        f"size:            {human_bytes(inventory.total_bytes)}",
    ]
    if inventory.oldest_use is not None and inventory.newest_use is not None:
        lines.append(f"least recent use: {human_age(now - inventory.oldest_use)} ago")
        lines.append(f"most recent use:  {human_age(now - inventory.newest_use)} ago")
    if inventory.temporary_files:
        lines.append(f"downloads in progress or left over: {inventory.temporary_files}")
    if inventory.repositories:
        lines.append("top repositories (bytes linked):")
        lines.extend(f"  {human_bytes(size):>10}  {repo}" for repo, size in inventory.top())
    return lines


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


def hit_ratio(metrics_text: str) -> tuple[float, int] | None:
    """From a running proxyd's /metrics: the share of cache lookups answered from the
    store (hit, revalidated or stale) and their number; None before any lookup."""
    from prometheus_client.parser import text_string_to_metric_families

    served = total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "proxyd_cache_lookups":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
                if sample.labels.get("result") != "miss":
                    served += sample.value
    return (served / total, int(total)) if total else None


def scrape_metrics(listen: str, timeout: float = 2.0) -> str | None:
    """The /metrics text of the proxyd serving on `listen` (plain HTTP), if one answers."""
    import urllib.error
    import urllib.request

    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())
    except (OSError, urllib.error.URLError, ValueError):
        return None
