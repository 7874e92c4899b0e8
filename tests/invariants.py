"""The drop's invariants (I1 no oversell, I2 one row per user, I3 every accepted request
a row or dead-lettered, I5 the counters close, I6 issued_quantity = rows), checked against
MySQL and Redis after a test moved coupons."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aiomysql
from redis.asyncio import Redis

from shared import keys
from shared.model import Coupon


@dataclass(frozen=True)
class Snapshot:
    """What the stores hold for one coupon once the pipeline has drained."""

    rows: dict[int, str | None]
    issued_quantity: int
    requested: int
    dead_lettered: int
    dead_users: set[int]
    pending: int
    slot_holders: set[int]
    marked_issued: set[int]
    marked_failed: set[int]


class Checker:
    """``await check(coupon, accepted=..., rejected=...)`` asserts I1–I6 for a drained coupon."""

    def __init__(self, pool: aiomysql.Pool, redis: Redis) -> None:
        self._pool = pool
        self._redis = redis

    async def snapshot(self, coupon_id: int) -> Snapshot:
        k = keys.CouponKeys(coupon_id)
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT user_id, request_id FROM coupon_issues WHERE coupon_id = %s", (coupon_id,)
            )
            pairs = await cur.fetchall()
            await cur.execute(
                "SELECT COUNT(*) FROM coupon_issues WHERE coupon_id = %s"
                " GROUP BY user_id HAVING COUNT(*) > 1",
                (coupon_id,),
            )
            doubled = await cur.fetchall()
            await cur.execute("SELECT issued_quantity FROM coupons WHERE id = %s", (coupon_id,))
            (issued_quantity,) = await cur.fetchone()
            await conn.rollback()
        assert not doubled, f"I2: users with more than one row: {doubled}"
        rows = {int(user): request for user, request in pairs}
        assert len(rows) == len(pairs), "I2: duplicate (coupon, user) rows"
        stream = await self._redis.xinfo_stream(k.requests)
        groups = await self._redis.xinfo_groups(k.requests)
        group = next(g for g in groups if g["name"] == keys.GROUP)
        dead_entries = await self._redis.xrange(k.dead)
        return Snapshot(
            rows=rows,
            issued_quantity=int(issued_quantity),
            requested=int(stream["entries-added"]),
            dead_lettered=len(dead_entries),
            dead_users={int(f["f_u"]) for _, f in dead_entries if f.get("f_u", "").isdigit()},
            pending=int(group["pending"]) + int(group.get("lag") or 0),
            slot_holders={int(u) for u in await self._redis.smembers(k.users)},  # type: ignore[misc]
            marked_issued={int(u) for u in await self._redis.smembers(k.issued)},  # type: ignore[misc]
            marked_failed={int(u) for u in await self._redis.smembers(k.failed)},  # type: ignore[misc]
        )

    async def __call__(
        self,
        coupon: Coupon,
        *,
        accepted: Iterable[int] = (),
        rejected: Iterable[int] = (),
        stream_history_lost: bool = False,
    ) -> Snapshot:
        """Assert the invariants; ``accepted`` got a 202, ``rejected`` only definite rejections.

        ``stream_history_lost``: Redis lost its data (and the stream's count of entries ever
        added) during the test, so I5, which closes that count, cannot be checked.
        """
        snap = await self.snapshot(coupon.id)
        accepted, rejected = set(accepted), set(rejected)
        issued_users = set(snap.rows)
        # I1: never more rows than the total.
        if coupon.total_quantity is not None:
            assert len(snap.rows) <= coupon.total_quantity, "I1: oversold"
        # I3: every accepted request became a row, or was dead-lettered and shows failed.
        lost = accepted - issued_users - snap.marked_failed
        assert not lost, f"I3: accepted but neither issued nor failed: {sorted(lost)[:10]}"
        # I4: no row for a user who only ever got a definite rejection.
        wrongly = rejected & issued_users
        assert not wrongly, f"I4: rows for rejected users: {sorted(wrongly)[:10]}"
        # I5: every accepted request is exactly one of issued, pending, dead-lettered.
        async_rows = sum(1 for request in snap.rows.values() if request is not None)
        assert (
            stream_history_lost or snap.requested == async_rows + snap.pending + snap.dead_lettered
        ), (
            f"I5: requested={snap.requested} issued={async_rows} pending={snap.pending}"
            f" dead={snap.dead_lettered}"
        )
        # I6: the counter equals the rows.
        assert snap.issued_quantity == len(snap.rows), (
            f"I6: issued_quantity={snap.issued_quantity} rows={len(snap.rows)}"
        )
        # Drained: Redis agrees with MySQL exactly; released slots are free again.
        assert snap.pending == 0, f"not drained: {snap.pending} pending"
        assert snap.slot_holders == issued_users, "slot holders differ from issued users"
        assert snap.marked_issued == issued_users, "issued marks differ from rows"
        assert not (snap.marked_failed & snap.slot_holders), "a failed user still holds a slot"
        return snap
