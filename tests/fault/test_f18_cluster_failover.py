"""F18 Redis Cluster master failover: the master that owns the drop's coupon is SIGKILLed
mid-drop; its replica takes over (``cluster-node-timeout`` 1 s here). With
``COUPON_REDIS_MIN_REPLICAS=1`` the gateway WAITs on the coupon's shard and the workers write
no row the shard's replica does not hold, so the failover loses no acknowledged request.

The killed master is then started again on its data: it rejoins as the new master's replica,
and with a replica to confirm them the 202s come back (a shard with two replicas would not
have to wait for that).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import cast

from redis.asyncio import RedisCluster

from shared import keys
from shared.redis import client as redis_client
from tests.fault.checker import check
from tests.fault.harness import RedisServer, Stack, replica_in_sync, wait_until
from tests.fault.load import LoadClient

RATE = 300


async def _owner_port(stack: Stack, coupon_id: int) -> int | None:
    """The port of the master serving the coupon's slot, as a live node reports it."""
    slot = cast(RedisCluster, stack.redis).keyslot(keys.CouponKeys(coupon_id).meta)
    for node in stack.cluster_nodes:
        if not node.running:
            continue
        client = redis_client.connect(node.url, socket_timeout=1)
        try:
            for start, end, master, *_ in await client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        finally:
            await client.aclose()
    return None


def _node(stack: Stack, port: int) -> RedisServer:
    return next(node for node in stack.cluster_nodes if node.server.port == port)


async def test_cluster_master_killed_mid_drop_loses_no_acknowledged_request(stacks, measure):
    stack = await stacks(cluster=True, redis_min_replicas=1, redis_replica_timeout_ms=200)
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        3_000, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    owner_port = await _owner_port(stack, coupon.id)
    assert owner_port is not None
    owner = _node(stack, owner_port)
    users = 5_000
    clicks = [(coupon.id, user) for user in range(1, users + 1)]
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=RATE, within=users / RATE)
        await client.wait_for_oks(150, within=30)

        client.phase = "failover"
        owner.kill()
        killed = time.monotonic()

        async def promoted() -> bool:
            port = await _owner_port(stack, coupon.id)
            return port is not None and port != owner_port

        promoted_at = await wait_until(promoted, within=60, what="the shard's replica promoted")
        await owner.start()
        await wait_until(lambda: replica_in_sync(owner), within=60, what="old master rejoined")

        client.phase = "after"
        first_ok_after = await client.accepting_again(killed)
        await load
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=120)

    verdict = await check(stack, coupon, client.history)
    line = measure(
        verdict.line(
            "F18 Cluster master SIGKILL",
            promotion=promoted_at - killed,
            downtime=first_ok_after - killed,
            recovery=drained_at - load_end,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert not verdict.lost, line
    assert verdict.unknown > 0, f"no request was caught by the kill: {line}"
