"""Reading what the servers' ``/metrics`` endpoints say, for the bench and the load test."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


def histogram_bounds(
    texts: Iterable[str], family: str, keep: Callable[[dict[str, str]], bool] = lambda _: True
) -> dict[str, Any]:
    """A Prometheus histogram summed over scrapes (and over the series ``keep`` accepts): how
    many it counted, the smallest bucket bounds holding p50 and p99, and how many took over 1 s.
    """
    buckets: dict[float, float] = defaultdict(float)
    for exposition in texts:
        for found in text_string_to_metric_families(exposition):
            if found.name != family:
                continue
            for sample in found.samples:
                if sample.name == f"{family}_bucket" and keep(sample.labels):
                    buckets[float(sample.labels["le"])] += sample.value
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0

    def bound(q: float) -> float | None:
        return next((b for b in bounds if total and buckets[b] >= q * total), None)

    return {
        "count": int(total),
        "p50_at_most_s": bound(0.5),
        "p99_at_most_s": bound(0.99),
        "over_1s": int(total - buckets.get(1.0, total)),
    }


async def text(session: aiohttp.ClientSession, url: str) -> str:
    """One scrape of a ``/metrics`` endpoint."""
    async with session.get(url) as response:
        return await response.text()
