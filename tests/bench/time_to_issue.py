"""How long a winner waits for the coupon: from the 202 (the acceptance time Redis wrote into the
stream entry) to the row in MySQL. Read two ways after a drop, so each checks the other:

- from the rows: ``date_created - date_issued`` of every row the workers wrote, exact
  percentiles (both columns are UTC; on one machine the two clocks are one clock);
- from the workers' ``coupon_worker_time_to_issue_seconds`` histograms, what the dashboard
  shows: the bucket bound that holds the p50 and the p99, and how many rows it counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp
import aiomysql

from tests.bench import scrape

METRIC = "coupon_worker_time_to_issue_seconds"


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending, non-empty sequence."""
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def from_rows(pool: aiomysql.Pool, coupon_id: int) -> dict[str, Any]:
    """Exact p50 / p99 / max over the coupon's rows written from the stream."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT TIMESTAMPDIFF(MICROSECOND, date_issued, date_created) FROM coupon_issues"
            " WHERE coupon_id = %s AND request_id IS NOT NULL",
            (coupon_id,),
        )
        waits = sorted(max(int(row[0]), 0) / 1e6 for row in await cur.fetchall())
        await conn.rollback()
    if not waits:
        return {"rows": 0, "p50_s": None, "p99_s": None, "max_s": None}
    return {
        "rows": len(waits),
        "p50_s": percentile(waits, 0.50),
        "p99_s": percentile(waits, 0.99),
        "max_s": waits[-1],
    }


async def from_metrics(session: aiohttp.ClientSession, urls: Iterable[str]) -> dict[str, Any]:
    """The workers' histograms summed: the smallest bucket bounds holding p50 and p99."""
    summary = scrape.histogram_bounds([await scrape.text(session, url) for url in urls], METRIC)
    return {"rows": summary.pop("count"), **summary}
