"""Comparing a coupon's Redis state with MySQL, and repairing the drift (``couponctl reconcile``).

Drift classes (all zero on a healthy, drained system; entries in flight are never counted):

- ``accepted_missing``: a request the group settled (acknowledged) that has neither a row nor a
  dead letter; repair re-queues it with its original acceptance time;
- ``issued_not_in_redis``: a row whose user holds no slot or has no issued mark; repair adds both;
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
    progress: Progress | None = None,
) -> Drift:
    """Find (and with ``repair``, fix) the drift of one coupon between Redis and MySQL."""
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
    drift.found["orphan_slot"] = [str(u) for u in sorted(holders - rows - set(requested_by))]
    if issued_quantity != len(rows):
        drift.found["counter_mismatch"] = [f"issued_quantity {issued_quantity} != {len(rows)}"]

    if repair and drift.total:
        await _repair(pool, redis, k, drift, lost)
        drift.repaired = True
    return drift


async def _repair(
    pool: aiomysql.Pool,
    redis: Redis,
    k: keys.CouponKeys,
    drift: Drift,
    lost: list[StreamEntry],
) -> None:
    released = [int(u) for u in drift.found["dead_slot_held"] + drift.found["orphan_slot"]]
    missing_marks = [int(u) for u in drift.found["issued_not_in_redis"]]
    async with redis.pipeline(transaction=True) as pipe:
        for entry in lost:  # re-queued with the original fields; the user keeps the slot
            requeued: dict[Any, Any] = {**entry.fields, "r": entry.entry_id}
            pipe.xadd(k.requests, requeued)
            pipe.sadd(k.users, entry.fields["u"])
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
