"""Restoring a coupon's Redis state from MySQL after Redis lost its data (``couponctl rebuild``).

MySQL holds every issued row; the request stream, if it survived, holds what was accepted but
not yet written. The rebuilt dedup set is the union of both, so no user can be accepted twice
and the stock counts every promise already made. The coupon is closed while it is rebuilt (its
snapshot hash is removed first, which makes every reservation answer 503) and opened again by
writing the snapshot last.

A stream lost with Redis's data restarts empty (entries-added 0) while the issued marks come
back from MySQL; the rebuild takes those marks off the coupon's balance correction
(:attr:`shared.keys.CouponKeys.correction`), so ``coupon_requests_unaccounted`` is 0 again, and
drift of a surviving stream stays visible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import aiomysql
import structlog
from redis.asyncio import Redis

from shared import keys
from shared.errors import CouponNotFound
from shared.model import Coupon
from shared.mysql import coupon_rows
from shared.ops import audit
from shared.ops.audit import Actor
from shared.redis import state as redis_state
from shared.redis.coupon_state import publish_state
from shared.redis.streams import scan

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RebuildReport:
    coupon_id: int
    issued: int
    """Users with a row in MySQL."""
    queued: int
    """Users accepted in the surviving stream and not yet written (they keep their slot)."""
    remaining: int | None


async def rebuild_coupon(
    pool: aiomysql.Pool, redis: Redis, coupon_id: int, *, actor: Actor
) -> RebuildReport:
    """Rebuild one coupon's snapshot, dedup set and issued marks; reopen it."""
    coupon = await coupon_rows.fetch_coupon(pool, coupon_id)
    if coupon is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    k = keys.CouponKeys(coupon_id)
    if coupon.retired:
        return await _rebuild_retired(pool, redis, coupon, actor)
    await redis.delete(k.meta)  # closed: reservations answer "no state" (503) from here on
    issued = await coupon_rows.issued_users(pool, coupon_id)
    dead = await coupon_rows.dead_request_ids(pool, coupon_id)
    queued: set[int] = set()
    backed: set[int] = set()  # users with a request in the stream that was not dead-lettered
    async for batch in scan(redis, k.requests):
        for entry in batch:
            user = entry.user_id
            if user is not None and entry.entry_id not in dead:
                backed.add(user)
                if user not in issued:
                    queued.add(user)
    # The balance of accepted requests (coupon_requests_unaccounted) counts issued marks
    # against the stream's entries: a mark restored for a row whose request is not in the
    # stream (lost with Redis's data) takes 1 off the correction, in the same MULTI, so the
    # balance closes again; restored marks of requests still in the stream need none.
    marked = {int(u) for u in await redis.smembers(k.issued)}
    unbacked = len(issued - marked - backed)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(k.users, k.issued)
        if issued or queued:
            pipe.sadd(k.users, *(issued | queued))
        if issued:
            pipe.sadd(k.issued, *issued)
            pipe.srem(k.failed, *issued)
        if unbacked:
            pipe.decrby(k.correction, unbacked)
        await pipe.execute()
    await publish_state(redis, coupon)  # the snapshot goes last: this reopens the coupon
    total = coupon.total_quantity
    report = RebuildReport(
        coupon_id=coupon_id,
        issued=len(issued),
        queued=len(queued),
        remaining=None if total is None else max(total - len(issued | queued), 0),
    )
    log.info("coupon_rebuilt", coupon_id=coupon_id, issued=report.issued, queued=report.queued)
    await audit.record(pool, actor, "rebuild", coupon_id, after=dataclasses.asdict(report))
    return report


async def _rebuild_retired(
    pool: aiomysql.Pool, redis: Redis, coupon: Coupon, actor: Actor
) -> RebuildReport:
    """A retired coupon gets back its marker only: the snapshot, saying it is retired."""
    k = keys.CouponKeys(coupon.id)
    await redis.delete(*k.all())
    await redis.hset(k.meta, mapping=coupon.to_meta())  # type: ignore[arg-type]
    await redis.publish(keys.CHANGES_CHANNEL, coupon.id)
    issued = len(await coupon_rows.issued_users(pool, coupon.id))
    total, reserved = coupon.total_quantity, coupon.retired_reserved or 0
    report = RebuildReport(
        coupon.id, issued, 0, None if total is None else max(total - reserved, 0)
    )
    await audit.record(pool, actor, "rebuild", coupon.id, after=dataclasses.asdict(report))
    return report


async def rebuild_all(pool: aiomysql.Pool, redis: Redis, *, actor: Actor) -> list[RebuildReport]:
    """Rebuild every coupon, then mark Redis as holding the whole state again."""
    ids = await coupon_rows.coupon_ids(pool)
    reports = [await rebuild_coupon(pool, redis, coupon_id, actor=actor) for coupon_id in ids]
    await redis_state.mark_initialised(redis)
    return reports
