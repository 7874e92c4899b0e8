"""F8 MariaDB crash: mariadbd is SIGKILLed while the workers commit small batches back to
back, and restarted at once (InnoDB crash recovery). A transaction cut mid-commit is either
recovered or rolled back; the worker cannot tell which, retries, and the idempotent write
resolves it. I1–I6; nothing dead-lettered."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from tests.fault.checker import check
from tests.fault.load import LoadClient

USERS, TOTAL, KILLS = 3_000, 2_600, 2


async def test_mysql_killed_mid_commit_resolves_every_batch_once(stacks, measure):
    # Batches of 20: the workers are nearly always inside a transaction when the kill comes.
    stack = await stacks(private_mysql=True, batch_size=20)
    mysql = stack.mysql_server
    assert mysql is not None
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        TOTAL, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    clicks = [(coupon.id, user) for user in range(1, USERS + 1)]
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=500, within=60)
        for kill in range(KILLS):
            await client.wait_for_oks(300 * (kill + 1), within=30)
            mysql.kill()
            await mysql.start()
        restarted = time.monotonic()
        await load
    drained_at = await stack.wait_drained([coupon.id], within=60)

    verdict = await check(stack, coupon, client.history)
    retries = [e for w in stack.services for e in w.events("mysql_unavailable")]
    # 2013 "Lost connection to server during query": a statement (or COMMIT) was in flight.
    cut_mid_query = sum("2013" in str(e.get("error")) for e in retries)
    line = measure(
        verdict.line(
            f"F8 MariaDB SIGKILL x{KILLS}",
            batch_retries=len(retries),
            cut_mid_query=cut_mid_query,
            recovery=drained_at - restarted,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert verdict.unknown == 0, line
    assert verdict.dead == 0, line
    assert verdict.rows == TOTAL, line
    assert (await stack.sql("SELECT COUNT(*) FROM coupon_issue_dead_letters"))[0][0] == 0
