"""F5 poison entries: malformed stream entries among valid ones, and accepted requests of a
coupon that was deleted from MySQL. The valid ones are all issued without waiting for the
poison; each poison entry is dead-lettered after ``COUPON_MAX_DELIVERIES`` deliveries, its slot
released and its user shown ``failed`` (and free to ask again); nothing stays pending."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import aiohttp

from shared import keys
from tests.fault.checker import check
from tests.fault.harness import Stack, wait_until
from tests.fault.load import Kind, LoadClient

VICTIMS = [10_001, 10_002, 10_003]
"""Users whose (hand-written) accepted entry is malformed: they hold a slot until it is
dead-lettered."""


async def plant_poison(stack: Stack, coupon_id: int) -> list[str]:
    """XADD malformed entries the way a buggy writer might; returns their entry ids."""
    k = keys.CouponKeys(coupon_id)
    now = str(await stack.redis_now_ms())
    c = str(coupon_id)
    await stack.redis.sadd(k.users, *map(str, VICTIMS))
    malformed = [
        {"c": c, "u": str(VICTIMS[0])},  # no acceptance time
        {"c": c, "u": str(VICTIMS[1]), "t": "0"},  # impossible acceptance time
        {"c": str(coupon_id + 1000), "u": str(VICTIMS[2]), "t": now},  # another coupon's
        {"c": c, "u": "99999999999999999999", "t": now},  # user id out of range
        {"c": c, "u": "abc", "t": now},  # not a user id
        {"garbage": "1"},  # nothing at all
    ]
    return [str(await stack.redis.xadd(k.requests, fields)) for fields in malformed]


async def status_of(gateway_url: str, coupon_id: int, user_id: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gateway_url}/v1/coupons/{coupon_id}/issues/{user_id}") as response,
    ):
        body = await response.json(content_type=None)
        return str(body.get("status", body.get("code")))


async def test_poison_entries_are_dead_lettered_while_valid_ones_are_all_issued(stacks, measure):
    # Reclaiming every 1.5 s: dead-lettering takes >= 3 idle periods, valid entries a moment.
    stack = await stacks(reclaim_idle_ms=1500, max_deliveries=3)
    gateway = await stack.start_gateway()
    now = datetime.now(UTC)
    window = {"start": now - timedelta(minutes=1), "end": now + timedelta(hours=1)}
    coupon = await stack.create_coupon(300, **window)
    deleted = await stack.create_coupon(50, **window)

    async with LoadClient(gateway.url) as client:
        await client.paced([(coupon.id, u) for u in range(1, 151)], rate=float("inf"), within=30)
        poison = await plant_poison(stack, coupon.id)
        await client.paced([(coupon.id, u) for u in range(151, 251)], rate=float("inf"), within=30)
        await client.paced([(deleted.id, u) for u in range(1, 31)], rate=float("inf"), within=30)
        # Accepted requests of a coupon that then vanished from MySQL: they can never commit.
        await stack.sql("DELETE FROM coupons WHERE id = %s", (deleted.id,))

        workers_started = time.monotonic()
        for slot in range(2):
            await stack.start_worker(slot)

        async def valid_ones_issued() -> bool:
            rows = await stack.sql(
                "SELECT COUNT(*) FROM coupon_issues WHERE coupon_id = %s", (coupon.id,)
            )
            return int(rows[0][0]) == 250

        valid_done = await wait_until(valid_ones_issued, within=30, what="valid entries issued")
        dead_when_valid_done = await stack.redis.xlen(keys.CouponKeys(coupon.id).dead)
        drained_at = await stack.wait_drained([coupon.id, deleted.id], within=30)

        shown = {user: await status_of(gateway.url, coupon.id, user) for user in VICTIMS}
        shown_deleted = {await status_of(gateway.url, deleted.id, u) for u in range(1, 31)}
        # A released slot is free again: the victims may ask once more, and get it.
        again = [await client.click(coupon.id, user) for user in VICTIMS]
    await stack.wait_drained([coupon.id], within=30)

    verdict = await check(stack, coupon, client.history)
    line = measure(
        verdict.line(
            "F5 poison",
            poison=len(poison),
            dead_deleted_coupon=await stack.redis.xlen(keys.CouponKeys(deleted.id).dead),
            valid_issued_after=valid_done - workers_started,
            poison_dead_after=drained_at - workers_started,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert dead_when_valid_done == 0, f"valid entries waited for the poison: {line}"
    dead = await stack.redis.xrange(keys.CouponKeys(coupon.id).dead)
    assert sorted(fields["source_id"] for _, fields in dead) == sorted(poison), line
    assert shown == dict.fromkeys(VICTIMS, "failed"), shown
    assert all(answer.kind is Kind.OK for answer in again), again
    assert verdict.rows == 250 + len(VICTIMS), line

    # The deleted coupon: every accepted request dead-lettered, in MySQL too, slots released.
    k = keys.CouponKeys(deleted.id)
    assert shown_deleted == {"failed"}, shown_deleted
    assert await stack.redis.scard(k.users) == 0
    assert await stack.redis.xlen(k.dead) == 30
    dead_rows = await stack.sql(
        "SELECT COUNT(*) FROM coupon_issue_dead_letters WHERE coupon_id = %s", (deleted.id,)
    )
    assert dead_rows[0][0] == 30
    assert (await stack.sql("SELECT COUNT(*) FROM coupon_issues WHERE coupon_id = %s",
                            (deleted.id,)))[0][0] == 0  # fmt: skip
