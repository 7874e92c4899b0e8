"""Comparing a coupon's Redis state with MySQL, and repairing the drift (``couponctl reconcile``).

Drift classes (all zero on a healthy, drained system; entries in flight are never counted):

- ``accepted_missing``: a request the group settled (acknowledged) that has neither a row nor a
  dead letter; repair re-queues it with its original acceptance time, as a new entry (field
  ``r``: the original), and adds 1 to the coupon's balance correction in the same MULTI, since
  the original stays in the stream (``coupon_requests_unaccounted`` shows it until then);
- ``issued_not_in_redis``: a row whose user holds no slot or has no issued mark; repair adds both
  (a mark for a row with no request in the stream takes 1 off the correction);
- ``dead_slot_held``: a user whose requests were all dead-lettered still holds a slot; repair
  releases it (the user shows ``failed`` and may ask again);
- ``orphan_slot``: a slot held by a user with no row and no request at all; repair releases it;
- ``counter_mismatch``: ``coupons.issued_quantity`` differs from the row count; repair sets it
  to the count under the coupon's row lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomysql
from redis.asyncio import Redis

from shared import keys
from shared.errors import CouponNotFound
from shared.mysql import coupon_rows
from shared.ops import audit
from shared.ops.audit import Actor
from shared.redis.streams import StreamEntry, scan, unsettled_ids

CLASSES = (
    "accepted_missing",
    "issued_not_in_redis",
    "dead_slot_held",
    "orphan_slot",
    "counter_mismatch",
)

Progress = Callable[[int], object]
"""Called with the number of stream entries just read (drives a progress bar)."""


@dataclass
class Drift:
    coupon_id: int
    found: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CLASSES})
    """Per class, the entry ids or user ids concerned (the counter: "<column> != <rows>")."""
    repaired: bool = False
    unbacked_marks: list[int] = field(default_factory=list)
    """Of ``issued_not_in_redis``, the users whose mark the repair adds for a row with no
    request in the stream (a stream lost with Redis's data): each takes 1 off the coupon's
    balance correction (:attr:`shared.keys.CouponKeys.correction`), as a lost original re-queued
    adds 1, so ``coupon_requests_unaccounted`` closes after the repair."""

    def counts(self) -> dict[str, int]:
        return {name: len(items) for name, items in self.found.items()}

    @property
    def total(self) -> int:
        return sum(self.counts().values())


async def _issued_view(pool: aiomysql.Pool, coupon_id: int) -> tuple[set[int], int]:
    view = await coupon_rows.issued_view(pool, coupon_id)
    if view is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    return view


async def reconcile(
    pool: aiomysql.Pool,
    redis: Redis,
    coupon_id: int,
    *,
    repair: bool = False,
    actor: Actor | None = None,
    progress: Progress | None = None,
) -> Drift:
    """Find (and with ``repair``, fix) the drift of one coupon between Redis and MySQL. A
    repair needs the ``actor`` who asked for it: it goes to the audit log with what it fixed.
    A retired coupon has no drift: its Redis state is gone by design."""
    coupon = await coupon_rows.fetch_coupon(pool, coupon_id)
    if coupon is not None and coupon.retired:
        return Drift(coupon_id)
    drift, lost = await _find_drift(pool, redis, coupon_id, progress)
    if repair and drift.total:
        await _repair_and_record(pool, redis, keys.CouponKeys(coupon_id), drift, lost, actor)
    return drift


async def _find_drift(
    pool: aiomysql.Pool, redis: Redis, coupon_id: int, progress: Progress | None
) -> tuple[Drift, list[StreamEntry]]:
    """The drift found, and the entries lost (settled without a row or a dead letter)."""
    k = keys.CouponKeys(coupon_id)
    rows, issued_quantity = await _issued_view(pool, coupon_id)
    dead_ids = await coupon_rows.dead_request_ids(pool, coupon_id)
    async for batch in scan(redis, k.dead):
        dead_ids.update(e.fields.get("source_id", "") for e in batch)
    unsettled = await unsettled_ids(redis, k.requests)
    holders = {int(u) for u in await redis.smembers(k.users)}
    marked = {int(u) for u in await redis.smembers(k.issued)}

    requested_by: dict[int, list[StreamEntry]] = {}
    async for batch in scan(redis, k.requests):
        for entry in batch:
            if entry.user_id is not None:
                requested_by.setdefault(entry.user_id, []).append(entry)
        if progress is not None:
            progress(len(batch))

    drift = Drift(coupon_id)
    lost: list[StreamEntry] = []
    for user, entries in requested_by.items():
        if user in rows:
            continue
        alive = [e for e in entries if e.entry_id not in dead_ids]
        if any(e.entry_id in unsettled for e in alive):
            continue  # still in flight: the workers will settle it
        if alive:
            lost.append(alive[-1])
            drift.found["accepted_missing"].append(alive[-1].entry_id)
        elif user in holders:
            drift.found["dead_slot_held"].append(str(user))
    in_flight = {
        user
        for user, entries in requested_by.items()
        if any(e.entry_id in unsettled for e in entries)
    }  # committed but not yet acknowledged: the issued mark comes with the acknowledgement
    unmarked = rows - (holders & marked) - in_flight
    drift.found["issued_not_in_redis"] = [str(u) for u in sorted(unmarked)]
    drift.unbacked_marks = [
        u
        for u in sorted(unmarked - marked)
        if all(e.entry_id in dead_ids for e in requested_by.get(u, []))
    ]
    drift.found["orphan_slot"] = [str(u) for u in sorted(holders - rows - set(requested_by))]
    if issued_quantity != len(rows):
        drift.found["counter_mismatch"] = [f"issued_quantity {issued_quantity} != {len(rows)}"]
    return drift, lost


async def _repair_and_record(  # noqa: PLR0917 - the repair's inputs, passed on
    pool: aiomysql.Pool,
    redis: Redis,
    k: keys.CouponKeys,
    drift: Drift,
    lost: list[StreamEntry],
    actor: Actor | None,
) -> None:
    if actor is None:
        raise ValueError("a reconcile repair needs the actor who asked for it")
    await _repair(pool, redis, k, drift, lost)
    drift.repaired = True
    repaired = {name: audit.listed(items) for name, items in drift.found.items() if items}
    await audit.record(pool, actor, "reconcile_repair", drift.coupon_id, after=repaired)


async def _repair(
    pool: aiomysql.Pool,
    redis: Redis,
    k: keys.CouponKeys,
    drift: Drift,
    lost: list[StreamEntry],
) -> None:
    released = [int(u) for u in drift.found["dead_slot_held"] + drift.found["orphan_slot"]]
    missing_marks = [int(u) for u in drift.found["issued_not_in_redis"]]
    # The lost originals stay in the stream, settled without a row: the balance counts each
    # re-queued one as placed; the marks of rows without a request take theirs off.
    correction = len(lost) - len(drift.unbacked_marks)
    async with redis.pipeline(transaction=True) as pipe:
        for entry in lost:  # re-queued with the original fields; the user keeps the slot
            requeued: dict[Any, Any] = {**entry.fields, "r": entry.entry_id}
            pipe.xadd(k.requests, requeued)
            pipe.sadd(k.users, entry.fields["u"])
        if correction:
            pipe.incrby(k.correction, correction)
        if missing_marks:
            pipe.sadd(k.users, *missing_marks)
            pipe.sadd(k.issued, *missing_marks)
        if released:
            pipe.srem(k.users, *released)
            pipe.sadd(k.failed, *released)
        await pipe.execute()
    await redis.publish(keys.CHANGES_CHANNEL, k.coupon_id)
    if drift.found["counter_mismatch"]:
        await coupon_rows.recount_issued(pool, k.coupon_id)
