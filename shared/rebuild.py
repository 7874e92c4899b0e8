"""Restoring a coupon's Redis state from MySQL after Redis lost its data (``couponctl rebuild``).

MySQL holds every issued row; the request stream, if it survived, holds what was accepted but
not yet written. The rebuilt dedup set is the union of both, so no user can be accepted twice
and the stock counts every promise already made. The coupon is closed while it is rebuilt (its
snapshot hash is removed first, which makes every reservation answer 503) and opened again by
writing the snapshot last.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiomysql
import structlog
from redis.asyncio import Redis

from shared import keys, redis_state
from shared.coupons import ensure_group, fetch_coupon
from shared.errors import CouponNotFound
from shared.streams import scan

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RebuildReport:
    coupon_id: int
    issued: int
    """Users with a row in MySQL."""
    queued: int
    """Users accepted in the surviving stream and not yet written (they keep their slot)."""
    remaining: int | None


async def issued_users(pool: aiomysql.Pool, coupon_id: int) -> set[int]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT user_id FROM coupon_issues WHERE coupon_id = %s", (coupon_id,))
        users = {int(row[0]) for row in await cur.fetchall()}
        await conn.rollback()
    return users


async def dead_request_ids(pool: aiomysql.Pool, coupon_id: int) -> set[str]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT request_id FROM coupon_issue_dead_letters WHERE coupon_id = %s", (coupon_id,)
        )
        ids = {str(row[0]) for row in await cur.fetchall()}
        await conn.rollback()
    return ids


async def rebuild_coupon(pool: aiomysql.Pool, redis: Redis, coupon_id: int) -> RebuildReport:
    """Rebuild one coupon's snapshot, dedup set and issued marks; reopen it."""
    coupon = await fetch_coupon(pool, coupon_id)
    if coupon is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    k = keys.CouponKeys(coupon_id)
    await redis.delete(k.meta)  # closed: reservations answer "no state" (503) from here on
    issued = await issued_users(pool, coupon_id)
    dead = await dead_request_ids(pool, coupon_id)
    queued: set[int] = set()
    async for batch in scan(redis, k.requests):
        for entry in batch:
            user = entry.user_id
            if user is not None and user not in issued and entry.entry_id not in dead:
                queued.add(user)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(k.users, k.issued)
        if issued or queued:
            pipe.sadd(k.users, *(issued | queued))
        if issued:
            pipe.sadd(k.issued, *issued)
            pipe.srem(k.failed, *issued)
        await pipe.execute()
    await ensure_group(redis, coupon_id)
    await redis.sadd(keys.ACTIVE_COUPONS, coupon_id)
    await redis.hset(k.meta, mapping=coupon.to_meta())  # type: ignore[arg-type]
    await redis.publish(keys.CHANGES_CHANNEL, coupon_id)
    total = coupon.total_quantity
    report = RebuildReport(
        coupon_id=coupon_id,
        issued=len(issued),
        queued=len(queued),
        remaining=None if total is None else max(total - len(issued | queued), 0),
    )
    log.info("coupon_rebuilt", coupon_id=coupon_id, issued=report.issued, queued=report.queued)
    return report


async def rebuild_all(pool: aiomysql.Pool, redis: Redis) -> list[RebuildReport]:
    """Rebuild every coupon, then mark Redis as holding the whole state again."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id FROM coupons ORDER BY id")
        ids = [int(row[0]) for row in await cur.fetchall()]
        await conn.rollback()
    reports = [await rebuild_coupon(pool, redis, coupon_id) for coupon_id in ids]
    await redis_state.mark_initialised(redis)
    return reports
