"""F16 Redis failover with the replica behind: with ``COUPON_REDIS_MIN_REPLICAS=1`` a primary
lost mid-drop loses no acknowledged request and sells nothing twice (I9).

The stack runs a primary, two replicas and three sentinels; gateway, workers and the checker
find the primary through the sentinels. Both replicas fall behind under load: their
replication links are held (a SIGSTOPped replica would not do: the kernel goes on receiving
the stream into its socket buffer, and it reads all of it once resumed; see
tests/fault/link.py). Every reservation made meanwhile exists on the primary only; WAIT cannot
confirm it and the client gets 503 "outcome unknown", never a 202. Then the primary is
SIGKILLed, the links are cut, and the sentinels promote a replica. What it never received is
gone with the primary.

Two variants:

- MariaDB frozen too, so the stream holds the only copy of the acknowledged entries: every
  202 must still become a row after the failover;
- MariaDB running and a stock small enough to run out on the primary while the replica is
  frozen: the workers must not write rows for the entries only the primary had, or the stock
  the failover gives back would be sold a second time (more rows than coupons).

After the promotion the sentinels point the other replica at the new primary; once it has
synced it confirms the reservations again and the 202s come back. (Two replicas is also what a
deployment with ``COUPON_REDIS_MIN_REPLICAS=1`` wants: one replica lost does not stop the
drop. With one, the 202s wait until the old primary is back as a replica.)
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.fault.checker import check
from tests.fault.harness import replica_promoted, wait_until
from tests.fault.load import LoadClient

RATE = 300


@pytest.mark.parametrize("mariadb", ["frozen", "running"])
async def test_failover_with_the_replica_behind_loses_no_acknowledged_request(
    stacks, measure, mariadb
):
    stack = await stacks(
        private_mysql=mariadb == "frozen",
        replicas=2,
        redis_min_replicas=1,
        redis_replica_timeout_ms=200,
    )
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    # Frozen MariaDB: plenty of stock, the point is the acknowledged entries in the stream.
    # Running: the primary sells out while the replica is frozen (see the module's doc).
    stock = 3_000 if mariadb == "frozen" else 400
    coupon = await stack.create_coupon(
        stock, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    users = 6_000
    clicks = [(coupon.id, user) for user in range(1, users + 1)]
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=RATE, within=users / RATE)
        await client.wait_for_oks(150, within=30)

        client.phase = "replica_behind"
        for link in stack.links:
            link.hold()
        if mariadb == "frozen":
            assert stack.mysql_server is not None
            stack.mysql_server.pause()

        async def unconfirmed_enough() -> bool:
            counts = client.history.counts(phase="replica_behind")
            if mariadb == "frozen":
                return counts["unknown"] >= 100
            return any(
                a.code == "INVALID_COUPON_ISSUE_QUANTITY"
                for a in client.history.answers
                if a.phase == "replica_behind"
            )

        await wait_until(unconfirmed_enough, within=60, what="reservations only the primary has")
        behind = client.history.counts(phase="replica_behind")

        client.phase = "failover"
        stack.redis_server.kill()
        killed = time.monotonic()
        for link in stack.links:
            link.cut()
        promoted_at = await wait_until(
            lambda: replica_promoted(stack), within=60, what="a replica promoted"
        )
        if stack.mysql_server is not None and stack.mysql_server.paused:
            stack.mysql_server.resume()

        client.phase = "after"
        first_ok_after = await client.accepting_again(killed)
        await load
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=120)

    verdict = await check(stack, coupon, client.history)
    line = measure(
        verdict.line(
            f"F16 Redis failover, replica behind, MariaDB {mariadb}",
            ok_while_behind=behind["ok"],
            unknown_while_behind=behind["unknown"],
            promotion=promoted_at - killed,
            downtime=first_ok_after - killed,
            recovery=drained_at - load_end,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert not verdict.lost, line
    # While the replica was frozen nothing could be confirmed: no 202 at all.
    assert behind["ok"] == 0, line
    if mariadb == "running":
        # The drop sold out on the primary, and the failover gave stock back: sold again,
        # exactly once, and no 202 was dead-lettered for want of stock.
        assert verdict.rows == stock, line
        assert verdict.dead == 0, line
