"""What the benchmarks and the load test assert after a run: the invariants, from MySQL and Redis.

The clients' view goes in (who was told "accepted", whose answer was unknown); the stores' view
comes out, compared: never more rows than the stock, never two rows for one user, every
accepted request a row (or dead-lettered and shown failed), no row for a user who was only ever
refused, ``issued_quantity`` equal to the rows, nothing left pending.

The stores are read, and I1, I2, I3 and I6 judged, as the tests do (:mod:`tests.invariants`);
what is the benchmarks' own is a report instead of assertions (a run lists every problem and
goes on), and I4 from the whole crowd: a load generator knows every answer it got, so any row
of a user neither told accepted nor left without an answer is one too many.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import aiomysql
from redis.asyncio import Redis

from shared.redis import streams
from shared.settings import Settings
from tests import invariants


@dataclass
class InvariantReport:
    """One coupon's end state against what the clients saw."""

    coupon_id: int
    total_quantity: int | None
    rows: int
    issued_quantity: int
    duplicate_users: int
    pending: int
    dead_lettered: int
    accepted_seen: int
    oversold: bool
    """I1, judged by :meth:`tests.invariants.Snapshot.oversold`."""
    counter_matches: bool
    """I6, judged by :attr:`tests.invariants.Snapshot.counter_matches`."""
    lost: list[int] = field(default_factory=list)
    """Told accepted, yet neither a row nor dead-lettered (shown failed)."""
    unexpected: list[int] = field(default_factory=list)
    """A row for a user who was never told accepted and had no unknown answer."""

    @property
    def ok(self) -> bool:
        return (
            not self.oversold
            and self.duplicate_users == 0
            and not self.lost
            and not self.unexpected
            and self.pending == 0
            and self.counter_matches
        )

    def headline(self) -> str:
        """``N issued of N, 0 duplicates, 0 lost``."""
        total = "unlimited" if self.total_quantity is None else f"{self.total_quantity:,}"
        return (
            f"{self.rows:,} issued of {total}, {self.duplicate_users} duplicates,"
            f" {len(self.lost)} lost"
        )

    def problems(self) -> list[str]:
        found = []
        if self.oversold:
            found.append(f"I1 oversold: {self.rows} rows > total {self.total_quantity}")
        if self.duplicate_users:
            found.append(f"I2 {self.duplicate_users} users with more than one row")
        if self.lost:
            found.append(f"I3 {len(self.lost)} accepted but lost, e.g. {self.lost[:5]}")
        if self.unexpected:
            found.append(f"I4 {len(self.unexpected)} rows for refused users: {self.unexpected[:5]}")
        if not self.counter_matches:
            found.append(f"I6 issued_quantity {self.issued_quantity} != rows {self.rows}")
        if self.pending:
            found.append(f"not drained: {self.pending} still pending")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "coupon_id": self.coupon_id,
            "total_quantity": self.total_quantity,
            "rows": self.rows,
            "issued_quantity": self.issued_quantity,
            "duplicate_users": self.duplicate_users,
            "pending": self.pending,
            "dead_lettered": self.dead_lettered,
            "accepted_seen": self.accepted_seen,
            "lost": len(self.lost),
            "unexpected_rows": len(self.unexpected),
            "ok": self.ok,
            "headline": self.headline(),
        }


async def backlog(redis: Redis, coupon_id: int) -> int:
    """Entries not yet committed and acknowledged: the group's pending plus its lag."""
    return (await streams.backlogs(redis, [coupon_id]))[coupon_id].total


def discovery_lead_seconds(settings: Settings) -> float:
    """How long before its window a coupon is created so that every worker already reads its
    stream when the window opens (a worker finds a new coupon within the discovery interval,
    once its blocking read returns): a drop announced ahead of time, as real ones are."""
    return settings.discovery_interval_seconds + settings.block_ms / 1000 + 1.0


async def wait_until(moment: datetime) -> None:
    """Sleep until a wall-clock moment (a coupon's window opening)."""
    await asyncio.sleep(max((moment - datetime.now(UTC)).total_seconds(), 0.0))


async def open_drop(
    session: aiohttp.ClientSession,
    base_url: str,
    admin_token: str,
    settings: Settings,
    *,
    total: int | None,
    title: str,
) -> int:
    """A coupon created ahead of its window, as a real drop is, so that the workers read its
    stream when the first request comes; returns its id once the window is open."""
    opens_at = datetime.now(UTC) + timedelta(seconds=discovery_lead_seconds(settings))
    coupon_id = await create_coupon(
        session, base_url, admin_token, total=total, title=title, opens_at=opens_at
    )
    await wait_until(opens_at)
    return coupon_id


async def wait_drained(redis: Redis, coupon_id: int, *, within: float) -> int:
    """Wait until nothing is pending for the coupon (or ``within`` passes); the backlog left."""
    deadline = time.monotonic() + within
    while True:
        left = await backlog(redis, coupon_id)
        if left == 0 or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


async def check_coupon(
    pool: aiomysql.Pool,
    redis: Redis,
    coupon_id: int,
    *,
    accepted: Iterable[int] | None,
    unknown: Iterable[int] = (),
) -> InvariantReport:
    """Compare the stores with the clients' view (``accepted=None``: counts only)."""
    snap = await invariants.read(pool, redis, coupon_id)
    report = InvariantReport(
        coupon_id=coupon_id,
        total_quantity=snap.total_quantity,
        rows=len(snap.rows) + snap.extra_rows,
        issued_quantity=snap.issued_quantity,
        duplicate_users=snap.extra_rows,
        pending=snap.pending,
        dead_lettered=snap.dead_lettered,
        accepted_seen=0,
        oversold=snap.oversold(snap.total_quantity),
        counter_matches=snap.counter_matches,
    )
    if accepted is not None:
        told = set(accepted)
        report.accepted_seen = len(told)
        report.lost = sorted(snap.lost(told))
        report.unexpected = sorted(set(snap.rows) - told - set(unknown))
    return report


async def create_coupon(
    session: aiohttp.ClientSession,
    base_url: str,
    admin_token: str,
    *,
    total: int | None,
    title: str,
    minutes: int = 24 * 60,
    opens_at: datetime | None = None,
) -> int:
    """Create a coupon through the admin API (the MySQL row and the Redis state); its id.

    Its window opens at ``opens_at``, or opened a minute ago.
    """
    now = datetime.now(UTC)
    body = {
        "title": title,
        "total_quantity": total,
        "discount_amount": 1000,
        "min_available_amount": 10000,
        "date_issue_start": (opens_at or now - timedelta(minutes=1)).isoformat(),
        "date_issue_end": (now + timedelta(minutes=minutes)).isoformat(),
    }
    async with session.post(
        f"{base_url}/admin/coupons",
        json=body,
        headers={"Authorization": f"Bearer {admin_token}"},
    ) as response:
        answer = await response.json(content_type=None)
        if response.status != 201:
            raise RuntimeError(f"creating a coupon failed: {response.status} {answer}")
        return int(answer["id"])
