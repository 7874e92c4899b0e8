"""F7 MariaDB outage: the private mariadbd is stopped for a while under load, then started
again. The gateway keeps accepting (acceptance never waits for MySQL), the workers back off
and catch up, and nothing is dead-lettered because of the outage."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from shared import keys
from tests.fault.checker import check
from tests.fault.load import Kind, LoadClient


async def _drop_through_mysql_outage(
    stacks, measure, *, outage: float, users: int, rate: float
) -> None:
    stack = await stacks(private_mysql=True)
    mysql = stack.mysql_server
    assert mysql is not None
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    total = users - 500
    coupon = await stack.create_coupon(
        total, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    clicks = [(coupon.id, user) for user in range(1, users + 1)]
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=rate, within=users / rate + 60)
        await client.wait_for_oks(200, within=30)
        client.phase = "outage"
        await mysql.terminate()
        # The fault's duration.
        await asyncio.sleep(outage)
        backlog_at_restart = await stack.backlog(coupon.id)
        await mysql.start()
        restarted = time.monotonic()
        client.phase = "after"
        await load
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=120)

    verdict = await check(stack, coupon, client.history)
    during = client.history.counts(phase="outage")
    line = measure(
        verdict.line(
            f"F7 MariaDB down {outage:.0f} s",
            ok_during_outage=during["ok"],
            unknown_during_outage=during["unknown"],
            backlog_at_restart=backlog_at_restart,
            recovery=drained_at - restarted,
            after_load=drained_at - load_end,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert during["ok"] > 0, f"the gateway stopped accepting while MySQL was down: {line}"
    assert verdict.unknown == 0, f"{line}\n{client.history.statuses(phase='outage')}"
    assert verdict.rows == total, line
    # Nothing was dead-lettered because of the outage, in Redis or in MySQL.
    assert verdict.dead == 0, line
    assert await stack.redis.xlen(keys.CouponKeys(coupon.id).dead) == 0
    assert (await stack.sql("SELECT COUNT(*) FROM coupon_issue_dead_letters"))[0][0] == 0
    assert all(a.kind is not Kind.UNKNOWN for a in client.history.answers)


async def test_mysql_stopped_under_load_loses_nothing_and_dead_letters_nothing(stacks, measure):
    await _drop_through_mysql_outage(stacks, measure, outage=3.0, users=2_500, rate=400)


@pytest.mark.slow
async def test_mysql_stopped_30_seconds_under_load(stacks, measure):
    await _drop_through_mysql_outage(stacks, measure, outage=30.0, users=16_000, rate=400)
