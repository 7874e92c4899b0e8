"""Retiring a finished coupon: its Redis state goes, its history stays in MySQL.

A coupon may be retired once its window has ended and every request it accepted is settled
(issued or dead-lettered; nothing waiting for a worker). Retirement, in order:

1. locks the coupon's MySQL row, so it runs once at a time and no admin change slips in;
2. seals the coupon in Redis (``retire.lua``): the window's end and the settlement are checked
   atomically, and the slots held are written into the snapshot; a refused check changes
   nothing and says why;
3. commits the retirement in MySQL: the counters Redis held, its dead letters (the Redis dead
   stream goes next) and the audit record, in one transaction;
4. deletes every other key of the coupon and takes it off ``coupons:active``, so no worker,
   monitor or shedding task reads it again.

Only the snapshot stays, as the marker that says "retired": the issue route still answers
"outside the window" from it, the public view shows the final stock, and the status route
answers from MySQL. A retirement cut short between 2 and 4 is finished by the next attempt
(the seal is idempotent, and a coupon retired in MySQL only needs step 4); an admin change
meanwhile voids the seal (``update.lua``), because MySQL, which it holds locked, says the coupon
lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiomysql
import structlog
from redis.asyncio import Redis

from shared import keys
from shared.errors import Conflict, CouponNotFound, RedisStateLost
from shared.model import from_ms, iso
from shared.mysql import audit_log, coupon_rows
from shared.mysql.pool import transaction
from shared.ops.audit import Actor
from shared.ops.dead_letters import DeadLetter
from shared.redis.scripts import Scripts, Seal
from shared.redis.streams import scan

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Retirement:
    coupon_id: int
    requested: int
    reserved: int
    dead_lettered: int
    already: bool
    """It was retired before this call; this call only finished removing its Redis keys."""


async def retire_coupon(
    pool: aiomysql.Pool,
    redis: Redis,
    coupon_id: int,
    *,
    actor: Actor,
    after_end_seconds: float = 0.0,
) -> Retirement:
    """Retire a coupon whose window ended at least ``after_end_seconds`` ago (Redis time) and
    whose accepted requests are all settled. Raises :class:`Conflict` with the reason when it
    may not be retired yet, :class:`CouponNotFound` when there is no such coupon."""
    async with transaction(pool, aiomysql.DictCursor) as cur:
        locked = await coupon_rows.lock_coupon(cur, coupon_id)
        if locked is None:
            raise CouponNotFound(f"coupon {coupon_id} does not exist")
        coupon, issued_quantity = locked
        kept = await coupon_rows.retirement_in(cur, coupon_id) if coupon.retired else None
        if kept is None:
            seal = await Scripts(redis).seal(coupon_id, int(after_end_seconds * 1000))
            if not seal.sealed:
                raise await _refusal(redis, coupon_id, seal, after_end_seconds)
            letters = await _dead_letters(redis, coupon_id)
            await coupon_rows.retire(
                cur,
                coupon_id,
                requested=seal.requested,
                reserved=seal.reserved,
                dead_letters=letters,
            )
            kept = {
                "requested": seal.requested,
                "reserved": seal.reserved,
                "dead_lettered": len(letters),
            }
            counters = {**kept, "issued_quantity": issued_quantity}
            await audit_log.append(
                cur, actor.entry("retire", coupon_id, before=counters, after={"retired": True})
            )
    await _remove_state(redis, coupon_id)
    log.info("coupon_retired", coupon_id=coupon_id, already=coupon.retired, **kept)
    return Retirement(coupon_id, already=coupon.retired, **kept)


async def _refusal(redis: Redis, coupon_id: int, seal: Seal, delay: float) -> Exception:
    if seal.state_missing:
        if not await redis.exists(keys.STATE_MARKER):
            return RedisStateLost("Redis lost the coupon state; rebuild it before retiring")
        return Conflict(f"coupon {coupon_id} has no Redis state; rebuild it first")
    if seal.end_ms:
        end = iso(from_ms(seal.end_ms))
        wait = f" and {delay:g} s have passed" if delay else ""
        return Conflict(
            f"coupon {coupon_id} is live: it may be retired once its window ends ({end}){wait}"
        )
    waiting = "requests not yet read by a worker" if seal.undelivered else ""
    if seal.pending:
        waiting = f"{seal.pending} requests read but not yet committed" + (
            " and more not yet read" if seal.undelivered else ""
        )
    return Conflict(f"coupon {coupon_id} is not settled: {waiting}; try again once drained")


async def _dead_letters(redis: Redis, coupon_id: int) -> list[tuple[str, int | None, str]]:
    """The dead stream's letters as MySQL keeps them: (request id, user id, reason)."""
    letters = []
    async for batch in scan(redis, keys.CouponKeys(coupon_id).dead):
        for letter in map(DeadLetter.from_entry, batch):
            if letter.source_id:
                letters.append((letter.source_id, letter.user_id, letter.reason[:64] or "unknown"))
    return letters


async def _remove_state(redis: Redis, coupon_id: int) -> None:
    """Everything but the snapshot goes; off the active set first, so the readers of the set
    drop it before its stream disappears."""
    k = keys.CouponKeys(coupon_id)
    await redis.srem(keys.ACTIVE_COUPONS, coupon_id)
    await redis.delete(*(key for key in k.all() if key != k.meta))
    await redis.publish(keys.CHANGES_CHANNEL, coupon_id)
