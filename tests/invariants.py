"""The drop's invariants (I1 no oversell, I2 one row per user, I3 every accepted request
a row or dead-lettered, I5 the counters close, I6 issued_quantity = rows), checked against
MySQL and Redis after a test moved coupons.

:func:`read` takes one coupon's :class:`Snapshot` of the stores; its methods say what each
invariant compares. :class:`Checker` asserts them in the tests; the benchmarks and the load
test (``tests/bench/checks.py``) report them from the same snapshot.
"""

from __future__ import annotations

from collections import Counter
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
    """User id -> request id of the row (None for a row the seed's sync route wrote)."""
    doubled: dict[int, int]
    """Users with more than one row, and how many they have (I2 wants none)."""
    total_quantity: int | None
    issued_quantity: int
    requested: int
    dead_lettered: int
    dead_users: set[int]
    pending: int
    slot_holders: set[int]
    marked_issued: set[int]
    marked_failed: set[int]
    correction: int = 0
    """``{coupon:ID}:correction``: requests the stream's sum cannot place by itself (lost
    originals a reconcile repair re-queued, minus rows rebuilt without a request in the
    stream), so I5 closes after a repair and a rebuild too."""

    def oversold(self, total_quantity: int | None) -> bool:
        """I1: more rows than the total."""
        return total_quantity is not None and len(self.rows) > total_quantity

    def lost(self, accepted: Iterable[int]) -> set[int]:
        """I3: accepted, yet neither a row nor dead-lettered and shown failed."""
        return set(accepted) - set(self.rows) - self.marked_failed

    @property
    def extra_rows(self) -> int:
        """I2: rows beyond the first of each user."""
        return sum(count - 1 for count in self.doubled.values())

    @property
    def counter_matches(self) -> bool:
        """I6: ``issued_quantity`` equals the rows."""
        return self.issued_quantity == len(self.rows)


async def read(pool: aiomysql.Pool, redis: Redis, coupon_id: int) -> Snapshot:
    """One coupon's snapshot of MySQL and Redis, judging nothing."""
    k = keys.CouponKeys(coupon_id)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT user_id, request_id FROM coupon_issues WHERE coupon_id = %s", (coupon_id,)
        )
        pairs = await cur.fetchall()
        await cur.execute(
            "SELECT total_quantity, issued_quantity FROM coupons WHERE id = %s", (coupon_id,)
        )
        total_quantity, issued_quantity = await cur.fetchone()
        await conn.rollback()
    per_user = Counter(int(user) for user, _ in pairs)
    stream = await redis.xinfo_stream(k.requests)
    groups = await redis.xinfo_groups(k.requests)
    group = next(g for g in groups if g["name"] == keys.GROUP)
    dead_entries = await redis.xrange(k.dead)
    return Snapshot(
        rows={int(user): request for user, request in pairs},
        doubled={user: count for user, count in per_user.items() if count > 1},
        total_quantity=None if total_quantity is None else int(total_quantity),
        issued_quantity=int(issued_quantity),
        requested=int(stream["entries-added"]),
        dead_lettered=len(dead_entries),
        dead_users={int(f["f_u"]) for _, f in dead_entries if f.get("f_u", "").isdigit()},
        pending=int(group["pending"]) + int(group.get("lag") or 0),
        slot_holders={int(u) for u in await redis.smembers(k.users)},  # type: ignore[misc]
        marked_issued={int(u) for u in await redis.smembers(k.issued)},  # type: ignore[misc]
        marked_failed={int(u) for u in await redis.smembers(k.failed)},  # type: ignore[misc]
        correction=int(await redis.get(k.correction) or 0),
    )


class Checker:
    """``await check(coupon, accepted=..., rejected=...)`` asserts I1–I6 for a drained coupon."""

    def __init__(self, pool: aiomysql.Pool, redis: Redis) -> None:
        self._pool = pool
        self._redis = redis

    async def snapshot(self, coupon_id: int) -> Snapshot:
        """The coupon's :class:`Snapshot`, with I2 (one row per user) asserted."""
        snap = await read(self._pool, self._redis, coupon_id)
        assert not snap.doubled, f"I2: users with more than one row: {snap.doubled}"
        return snap

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
        assert not snap.oversold(coupon.total_quantity), "I1: oversold"
        # I3: every accepted request became a row, or was dead-lettered and shows failed.
        lost = snap.lost(accepted)
        assert not lost, f"I3: accepted but neither issued nor failed: {sorted(lost)[:10]}"
        # I4: no row for a user who only ever got a definite rejection.
        wrongly = rejected & issued_users
        assert not wrongly, f"I4: rows for rejected users: {sorted(wrongly)[:10]}"
        # I5: every accepted request is exactly one of issued, pending, dead-lettered.
        async_rows = sum(1 for request in snap.rows.values() if request is not None)
        assert stream_history_lost or (
            snap.requested == async_rows + snap.pending + snap.dead_lettered + snap.correction
        ), (
            f"I5: requested={snap.requested} issued={async_rows} pending={snap.pending}"
            f" dead={snap.dead_lettered} correction={snap.correction}"
        )
        # I6: the counter equals the rows.
        assert snap.counter_matches, (
            f"I6: issued_quantity={snap.issued_quantity} rows={len(snap.rows)}"
        )
        # Drained: Redis agrees with MySQL exactly; released slots are free again.
        assert snap.pending == 0, f"not drained: {snap.pending} pending"
        assert snap.slot_holders == issued_users, "slot holders differ from issued users"
        assert snap.marked_issued == issued_users, "issued marks differ from rows"
        assert not (snap.marked_failed & snap.slot_holders), "a failed user still holds a slot"
        return snap

    async def retired(
        self, coupon: Coupon, before: Snapshot | None, *, accepted: Iterable[int] = ()
    ) -> None:
        """Assert what a retirement keeps, from MySQL alone (the coupon's Redis sets are gone):
        I1, I2 and I6 on the rows; every accepted user has a row or a dead letter (I3); the
        kept counters close (I5: requested = async rows + dead letters, the correction of
        repairs and rebuilds taken off ``requested`` when it was kept); and, given ``before``
        (the drained snapshot taken just before the retirement), nothing changed with it."""
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT user_id, request_id FROM coupon_issues WHERE coupon_id = %s", (coupon.id,)
            )
            rows = {int(user): request for user, request in await cur.fetchall()}
            await cur.execute(
                "SELECT issued_quantity FROM coupons WHERE id = %s", (coupon.id,)
            )
            (issued_quantity,) = await cur.fetchone()
            await cur.execute(
                "SELECT user_id FROM coupon_issue_dead_letters WHERE coupon_id = %s", (coupon.id,)
            )
            dead_users = {int(user) for (user,) in await cur.fetchall() if user is not None}
            await cur.execute(
                "SELECT requested, dead_lettered FROM coupon_retirements WHERE coupon_id = %s",
                (coupon.id,),
            )
            kept = await cur.fetchone()
            await conn.rollback()
        assert kept is not None, "no retirement row"
        total = coupon.total_quantity
        assert total is None or len(rows) <= total, "I1: oversold"
        assert int(issued_quantity) == len(rows), "I6"
        lost = set(accepted) - set(rows) - dead_users
        assert not lost, f"I3: accepted but neither issued nor dead-lettered: {sorted(lost)[:10]}"
        requested, dead_lettered = int(kept[0]), int(kept[1])
        if before is not None:
            assert rows == before.rows, "the rows changed with the retirement"
            assert int(issued_quantity) == before.issued_quantity
            kept_before = (before.requested - before.correction, before.dead_lettered)
            assert (requested, dead_lettered) == kept_before
        async_rows = sum(1 for request in rows.values() if request is not None)
        assert requested == async_rows + dead_lettered, "I5: the kept counters do not close"
