"""F17 isolated old primary: the primary is frozen (SIGSTOP) under load until the sentinels
promote a replica, then resumes, still believing it is the primary until the sentinels demote
it. With ``COUPON_REDIS_MIN_REPLICAS=1`` it hands out no 202 that the new primary lacks: its
replicas follow the new primary now, so a reservation it makes is confirmed by none, and the
gateway's pool, which asks the sentinels every half second and after every failed
connection, no longer sends it anything.

Besides the load through the gateway, the test reserves on the stale primary directly, the
moment it resumes, with the gateway's own script and WAIT: that reservation must not count as
confirmed (or must be refused outright, if the demotion came first). The same call without WAIT
is reported too: it shows the 202 that ``COUPON_REDIS_MIN_REPLICAS=0`` would have given.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError

from shared.redis import client as redis_client
from shared.redis.replication import ReplicaWait
from shared.redis.scripts import IssueResult, Scripts
from tests.fault.checker import check
from tests.fault.harness import (
    RedisServer,
    Stack,
    replica_promoted,
    sentinel_primary,
    wait_until,
)
from tests.fault.load import LoadClient

RATE = 300
STALE_USERS = (10_000_001, 10_000_002)


async def _stale_reservation(
    server: RedisServer, coupon_id: int, user_id: int, *, wait: bool
) -> str:
    """Reserve on the old primary directly: "confirmed", "unconfirmed" or "refused"."""
    direct = redis_client.connect(server.url, socket_timeout=2.0)
    replicas = ReplicaWait(direct, replicas=1, timeout_ms=200, path="reserve") if wait else None
    try:
        outcome = await Scripts(direct, replicas).reserve(coupon_id, [user_id])
    except (RedisError, OSError) as exc:  # READONLY once demoted
        return f"refused ({type(exc).__name__})"
    finally:
        await direct.aclose()
    accepted = [r for r in outcome.reservations if r.result is IssueResult.ACCEPTED]
    if not accepted:
        return "rejected"
    return "confirmed" if outcome.replicated else "unconfirmed"


async def _replicas_follow(stack: Stack) -> bool:
    """Every replica but the promoted one replicates from the new primary."""
    primary = await sentinel_primary(stack)
    for replica in stack.replicas:
        if replica.server.port == primary:
            continue
        client = redis_client.connect(replica.url, socket_timeout=1)
        try:
            info = await client.info("replication")
        finally:
            await client.aclose()
        if info.get("role") != "slave" or int(info.get("master_port", 0)) != primary:
            return False
    return True


async def test_isolated_old_primary_hands_out_no_unreplicated_202(stacks, measure):
    stack = await stacks(replicas=2, redis_min_replicas=1, redis_replica_timeout_ms=200)
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        None, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    users = 5_000
    clicks = [(coupon.id, user) for user in range(1, users + 1)]
    old_primary = stack.redis_server
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=RATE, within=users / RATE)
        await client.wait_for_oks(150, within=30)

        client.phase = "isolated"
        old_primary.pause()
        frozen = time.monotonic()
        promoted_at = await wait_until(
            lambda: replica_promoted(stack), within=60, what="a replica promoted"
        )
        # Resumed once the failover is through: the other replica follows the new primary.
        # (Before that, a replica still attached to the old primary could confirm its writes;
        # the gateways' pools fence that window off by asking the sentinels.)
        await wait_until(lambda: _replicas_follow(stack), within=60, what="replicas reconfigured")
        client.phase = "stale_primary_back"
        old_primary.resume()
        with_wait = await _stale_reservation(old_primary, coupon.id, STALE_USERS[0], wait=True)
        without_wait = await _stale_reservation(old_primary, coupon.id, STALE_USERS[1], wait=False)

        client.phase = "after"
        first_ok_after = await client.accepting_again(frozen)
        await load
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=120)

    verdict = await check(stack, coupon, client.history)
    line = measure(
        verdict.line(
            "F17 isolated old primary",
            promotion=promoted_at - frozen,
            downtime=first_ok_after - frozen,
            recovery=drained_at - load_end,
            stale_with_wait=with_wait.replace(" ", "_"),
            stale_without_wait=without_wait.replace(" ", "_"),
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert not verdict.lost, line
    assert with_wait != "confirmed", line
    # The direct reservations were never answered 202 to anyone, and must not have become rows
    # on the new primary's side either: the stale primary's writes are discarded by its resync.
    rows = await stack.sql(
        "SELECT COUNT(*) FROM coupon_issues WHERE user_id IN (%s, %s)", STALE_USERS
    )
    assert rows[0][0] == 0, line
