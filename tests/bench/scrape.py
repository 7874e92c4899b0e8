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


def histogram_totals(exposition: str, family: str) -> dict[str, Any]:
    """One scrape's histogram ``family``, summed over its series: ``count``, ``sum`` and the
    cumulative count of each bucket bound (``buckets``); subtract two with :func:`minus`."""
    buckets: dict[float, float] = defaultdict(float)
    count = total = 0.0
    for found in text_string_to_metric_families(exposition):
        if found.name != family:
            continue
        for sample in found.samples:
            if sample.name == f"{family}_bucket":
                buckets[float(sample.labels["le"])] += sample.value
            elif sample.name == f"{family}_count":
                count += sample.value
            elif sample.name == f"{family}_sum":
                total += sample.value
    return {"count": count, "sum": total, "buckets": dict(buckets)}


def minus(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What a histogram counted between two :func:`histogram_totals` (or sums of them)."""
    return {
        "count": after["count"] - before["count"],
        "sum": after["sum"] - before["sum"],
        "buckets": {le: n - before["buckets"].get(le, 0.0) for le, n in after["buckets"].items()},
    }


def plus(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "count": a["count"] + b["count"],
        "sum": a["sum"] + b["sum"],
        "buckets": {
            le: a["buckets"].get(le, 0.0) + b["buckets"].get(le, 0.0)
            for le in {*a["buckets"], *b["buckets"]}
        },
    }


def summary(totals: dict[str, Any]) -> dict[str, Any]:
    """Count, mean, and the smallest bucket bounds holding p50 and p99 (None when empty)."""
    count = totals["count"]
    bounds = sorted(totals["buckets"])

    def bound(q: float) -> float | None:
        return next((b for b in bounds if count and totals["buckets"][b] >= q * count), None)

    return {
        "count": int(count),
        "mean": totals["sum"] / count if count else None,
        "p50_at_most": bound(0.5),
        "p99_at_most": bound(0.99),
    }


def counter_total(exposition: str, sample_name: str) -> float:
    """The sum of every sample called ``sample_name`` (a counter's ``..._total``) in a scrape."""
    return sum(
        sample.value
        for found in text_string_to_metric_families(exposition)
        for sample in found.samples
        if sample.name == sample_name
    )
