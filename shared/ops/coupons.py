"""Creating, changing and inspecting coupons: the operations the admin API and couponctl share.

MySQL is the system of record and Redis holds the state the hot path judges by; each operation
here keeps the two in step, so neither caller can change one store without the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import aiomysql
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.coupon_requests import CouponChange, NewCoupon
from shared.errors import (
    Conflict,
    CouponNotFound,
    IdempotencyKeyReused,
    RedisStateLost,
    Unavailable,
)
from shared.model import Coupon
from shared.mysql import audit_log, coupon_rows
from shared.mysql.pool import transaction
from shared.ops.audit import Actor
from shared.redis import state as redis_state
from shared.redis.coupon_state import load_snapshot, publish_state
from shared.redis.scripts import Scripts, UpdateStatus
from shared.redis.streams import backlogs, entries_added

log = structlog.get_logger(__name__)


async def create_coupon(
    pool: aiomysql.Pool, redis: Redis, new: NewCoupon, *, actor: Actor
) -> Coupon:
    """Insert the MySQL row, then initialise the Redis state so the coupon is ready to issue.

    If Redis cannot be written the row is deleted again, so a coupon exists either in both
    stores or in neither. Refused while Redis has lost its state: creating would mark the
    empty Redis as complete and hide the loss of every other coupon.
    """
    await _refuse_while_state_lost(pool, redis)
    coupon_id = await coupon_rows.insert_coupon(pool, new, _created(actor, new))
    return await _go_live(pool, redis, new, coupon_id, actor)


async def create_coupon_once(
    pool: aiomysql.Pool, redis: Redis, new: NewCoupon, idempotency_key: str, *, actor: Actor
) -> tuple[Coupon, bool]:
    """:func:`create_coupon` under an Idempotency-Key: a retry (a timeout, a double click)
    with the same key and the same request gets the coupon the first one made, and no second
    row or Redis state; the same key with another request is refused (422). Returns the coupon
    and whether it is such a replay.

    A replay answers with the coupon as MySQL holds it now. It is refused with a 503 (retry)
    while the coupon's Redis state is not written yet, that is while the first creation is
    still running, so a replay never confirms a coupon that Redis might still refuse.
    """
    await _refuse_while_state_lost(pool, redis)
    coupon_id, holder = await coupon_rows.insert_coupon_once(
        pool, new, idempotency_key, _created(actor, new)
    )
    if holder is None:
        return await _go_live(pool, redis, new, coupon_id, actor), False
    if holder != new.fingerprint():
        raise IdempotencyKeyReused(
            f"Idempotency-Key {idempotency_key!r} created coupon {coupon_id} from another body;"
            " use a new key for a new coupon"
        )
    coupon = await coupon_rows.fetch_coupon(pool, coupon_id)
    try:
        live = coupon is not None and await load_snapshot(redis, coupon_id) is not None
    except RedisError as exc:
        raise Unavailable("Redis is unreachable; repeat the request") from exc
    if coupon is None or not live:
        raise Unavailable(f"coupon {coupon_id} of this Idempotency-Key is still being created")
    log.info("coupon_create_replayed", coupon_id=coupon_id)
    return coupon, True


async def _refuse_while_state_lost(pool: aiomysql.Pool, redis: Redis) -> None:
    if not await redis_state.state_present(redis, lambda: coupon_rows.any_coupon(pool)):
        raise RedisStateLost("Redis lost the coupon state; rebuild it before creating coupons")


def _created(actor: Actor, new: NewCoupon) -> audit_log.AuditEntry:
    """The audit record of a creation; the insert fills in the coupon's id."""
    values = Coupon(id=0, **dataclasses.asdict(new)).public()
    del values["id"]
    return actor.entry("create", None, after=values)


async def _go_live(
    pool: aiomysql.Pool, redis: Redis, new: NewCoupon, coupon_id: int, actor: Actor
) -> Coupon:
    """Publish a coupon just inserted; undo the insert (its key with it) if Redis refuses."""
    coupon = Coupon(id=coupon_id, **dataclasses.asdict(new))
    try:
        await publish_state(redis, coupon)
    except RedisError as exc:
        undone = actor.entry("create_undone", coupon_id, after={"reason": f"Redis: {exc}"})
        await coupon_rows.delete_coupon(pool, coupon_id, undone)
        log.error("coupon_create_rolled_back", coupon_id=coupon_id, error=str(exc))
        raise Unavailable("Redis is unreachable; the coupon was not created") from exc
    log.info("coupon_created", coupon_id=coupon_id, total_quantity=new.total_quantity)
    return coupon


async def update_coupon(
    pool: aiomysql.Pool, redis: Redis, coupon_id: int, change: CouponChange, *, actor: Actor
) -> Coupon:
    """Apply an admin change to both stores; every gateway sees it within a pub/sub round trip.

    The coupon row stays locked (``FOR UPDATE``) while Redis is rewritten, so changes apply one
    at a time and workers wait for the outcome. The stock check runs inside Redis, atomically
    with the reservations it guards: a total below the slots already promised is refused (409),
    never applied. Redis changes first; should MySQL then fail, the caller gets a 503 and
    repeating the same PATCH makes the two stores agree again. The audit record is written in
    the same transaction: it exists exactly when the change does.
    """
    async with transaction(pool, aiomysql.DictCursor) as cur:
        locked = await coupon_rows.lock_coupon(cur, coupon_id)
        if locked is None:
            raise CouponNotFound(f"coupon {coupon_id} does not exist")
        current, issued_quantity = locked
        if current.retired:
            raise Conflict(f"coupon {coupon_id} is retired; create a new coupon instead")
        updated = change.apply(current)
        total = updated.total_quantity
        if total is not None and total < issued_quantity:
            raise Conflict(f"total_quantity {total} is below the {issued_quantity} issued")
        await coupon_rows.update_coupon(cur, updated)
        await audit_log.append(cur, _changed(actor, change, current, updated))
        try:
            status, reserved = await Scripts(redis).update(coupon_id, total, updated.to_meta())
        except RedisError as exc:
            raise Unavailable("Redis is unreachable; repeat the change") from exc
        if status is UpdateStatus.STATE_MISSING:
            raise Unavailable(
                f"coupon {coupon_id} has no Redis state; rebuild it before changing it"
            )
        if status is UpdateStatus.BELOW_RESERVED:
            raise Conflict(
                f"total_quantity {total} is below the {reserved} requests already accepted"
            )
    log.info("coupon_updated", coupon_id=coupon_id, changes=sorted(change.changes))
    return updated


def _changed(
    actor: Actor, change: CouponChange, current: Coupon, updated: Coupon
) -> audit_log.AuditEntry:
    """The audit record of an update, named by what it does: pause, resume, top_up (only the
    total, raised) or update; with the changed fields' values before and after."""
    fields = sorted(change.changes)
    before, after = current.public(), updated.public()
    action = "update"
    if fields == ["paused"]:
        action = "pause" if updated.paused else "resume"
    elif fields == ["total_quantity"] and _raised(current.total_quantity, updated.total_quantity):
        action = "top_up"
    return actor.entry(
        action,
        current.id,
        before={name: before[name] for name in fields},
        after={name: after[name] for name in fields},
    )


def _raised(old: int | None, new: int | None) -> bool:
    """More stock than before (unlimited counts as more; nothing is more than unlimited)."""
    return old is not None and (new is None or new > old)


async def list_coupons(
    pool: aiomysql.Pool, *, after_id: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    """Coupons by id, a page at a time, each with its MySQL ``issued_quantity``."""
    page = await coupon_rows.list_coupons(pool, after_id=after_id, limit=limit)
    return [{**coupon.public(), "issued_quantity": issued} for coupon, issued in page]


@dataclass(frozen=True, slots=True)
class Counters:
    """Where every accepted request of one coupon stands: each is exactly one of issued,
    pending or dead-lettered."""

    requested: int
    issued: int
    issued_quantity: int
    pending: int
    dead_lettered: int
    remaining: int | None
    reserved: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def show_coupon(pool: aiomysql.Pool, redis: Redis, coupon_id: int) -> dict[str, Any]:
    """A coupon with its counters; :class:`CouponNotFound` when there is no such coupon."""
    coupon = await coupon_rows.fetch_coupon(pool, coupon_id)
    if coupon is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    return {**coupon.public(), **(await counters(pool, redis, coupon)).as_dict()}


async def counters(pool: aiomysql.Pool, redis: Redis, coupon: Coupon) -> Counters:
    """Read the counters from both stores; between a commit and its ack an entry shows twice.
    A retired coupon's come from MySQL alone: what its Redis state held when it was retired."""
    if coupon.retired:
        return await _retired_counters(pool, coupon)
    k = keys.CouponKeys(coupon.id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xinfo_stream(k.requests)
        pipe.xlen(k.dead)
        pipe.scard(k.users)
        stream, dead, reserved = await pipe.execute(raise_on_error=False)
    requested = entries_added(stream)
    backlog = (await backlogs(redis, [coupon.id]))[coupon.id]
    issued_quantity, issued = await coupon_rows.issue_counts(pool, coupon.id) or (0, 0)
    total = coupon.total_quantity
    return Counters(
        requested=requested,
        issued=issued,
        issued_quantity=issued_quantity,
        pending=backlog.total,
        dead_lettered=int(dead),
        remaining=None if total is None else max(total - int(reserved), 0),
        reserved=int(reserved),
    )


async def _retired_counters(pool: aiomysql.Pool, coupon: Coupon) -> Counters:
    kept = await coupon_rows.retirement(pool, coupon.id) or {}
    issued_quantity, issued = await coupon_rows.issue_counts(pool, coupon.id) or (0, 0)
    total, reserved = coupon.total_quantity, kept.get("reserved", 0)
    return Counters(
        requested=kept.get("requested", 0),
        issued=issued,
        issued_quantity=issued_quantity,
        pending=0,
        dead_lettered=kept.get("dead_lettered", 0),
        remaining=None if total is None else max(total - reserved, 0),
        reserved=reserved,
    )
