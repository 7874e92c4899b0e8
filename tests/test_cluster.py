"""A drop on a real three-master Redis Cluster: coupons spread over the shards, every script and
transaction stays on one shard (all keys of a coupon share the hash tag ``{coupon:ID}``), and
the invariants hold per coupon."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from mirakuru import TCPExecutor
from port_for import get_port
from redis.asyncio import Redis

from gateway.app import create_app
from shared import keys
from shared.coupon_requests import CouponChange, NewCoupon
from shared.model import Coupon
from shared.ops import coupons
from shared.ops.coupons import update_coupon
from shared.redis import client as redis_client
from shared.settings import Settings
from tests.helpers import TEST_ACTOR, drain, issue, wait_for
from tests.invariants import Checker
from tests.servers import find_binary
from tests.sse import EventReader

REDIS_SERVER = find_binary("redis-server")
REDIS_CLI = find_binary("redis-cli")


@pytest.fixture(scope="module")
def cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three redis-server processes in cluster mode, joined into one cluster."""
    ports = [get_port(None) for _ in range(3)]
    # The cluster bus would default to port + 10000, which may be taken: pick free ones too.
    bus_ports = [get_port(None) for _ in range(3)]
    servers = []
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            data = tmp_path_factory.mktemp(f"cluster-{port}")
            server = TCPExecutor(
                [
                    REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(bus_port),
                    "--dir", str(Path(data)), "--appendonly", "yes", "--save", "",
                    "--maxmemory-policy", "noeviction",
                ],
                host="127.0.0.1", port=port, timeout=30,
            )  # fmt: skip
            server.start()
            servers.append(server)
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        yield ports
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def cluster_settings(cluster_ports: list[int], settings: Settings) -> AsyncIterator[Settings]:
    changed = settings.replace(
        redis_url=f"redis://127.0.0.1:{cluster_ports[0]}/0", redis_cluster=True
    )
    nodes = [
        redis_client.connect(f"redis://127.0.0.1:{p}/0", socket_timeout=5.0) for p in cluster_ports
    ]

    async def every_node_sees_the_cluster_up() -> bool:
        states = [
            (await node.execute_command("CLUSTER INFO")).get("cluster_state") for node in nodes
        ]
        return states == ["ok"] * len(nodes)

    await wait_for(every_node_sees_the_cluster_up, within=30.0, interval=0.2)
    for node in nodes:
        await node.flushall()
        await node.aclose()
    return changed


@pytest.fixture
async def cluster_redis(cluster_settings: Settings) -> AsyncIterator[Redis]:
    client = redis_client.connect(cluster_settings.redis_url, socket_timeout=5.0, cluster=True)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_client(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis, pool: Any
) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(cluster_settings))


async def test_drop_of_several_coupons_across_the_shards(
    cluster_client, cluster_redis, cluster_settings, pool, make_coupon_on, cluster_ports
):
    coupons = [await make_coupon_on(cluster_redis, total=total) for total in (20, 30, 40, None)]
    owners = {await _owner(cluster_redis, keys.CouponKeys(c.id).requests) for c in coupons}
    assert len(owners) >= 2, "the coupons should live on more than one shard"

    rng = random.Random(11)
    clicks = [
        (c.id, user) for c in coupons for user in range(1, 81) for _ in range(rng.randint(1, 2))
    ]
    rng.shuffle(clicks)
    gate = asyncio.Semaphore(100)

    async def click(coupon_id: int, user: int) -> tuple[int, int, int]:
        async with gate:
            return coupon_id, user, (await issue(cluster_client, coupon_id, user))[0]

    answers = await asyncio.gather(*(click(c, u) for c, u in clicks))
    assert {status for *_, status in answers} <= {202, 409}
    await drain(cluster_redis, pool, cluster_settings)
    checker = Checker(pool, cluster_redis)
    for coupon in coupons:
        accepted = {u for c, u, s in answers if c == coupon.id and s == 202}
        refused = {u for c, u, s in answers if c == coupon.id and s != 202} - accepted
        snapshot = await checker(coupon, accepted=accepted, rejected=refused)
        expected = 80 if coupon.total_quantity is None else coupon.total_quantity
        assert len(snapshot.rows) == expected


async def test_top_up_reaches_the_gateway_through_cluster_pub_sub(
    cluster_client, cluster_redis, cluster_settings, pool, make_coupon_on
):
    coupon = await make_coupon_on(cluster_redis, total=1)
    assert (await issue(cluster_client, coupon.id, 1))[0] == 202
    assert (await issue(cluster_client, coupon.id, 2))[0] == 409  # sold out, flag cached
    await update_coupon(
        pool, cluster_redis, coupon.id, CouponChange({"total_quantity": 2}), actor=TEST_ACTOR
    )

    async def sells_again() -> bool:
        return (await issue(cluster_client, coupon.id, 2))[0] == 202

    await wait_for(sells_again, within=5.0)
    await drain(cluster_redis, pool, cluster_settings)
    await Checker(pool, cluster_redis)(
        dataclasses.replace(coupon, total_quantity=2), accepted={1, 2}
    )


async def test_the_live_feed_follows_coupons_on_every_shard(
    cluster_client, cluster_redis, cluster_settings, pool, make_coupon_on
):
    coupons = [await make_coupon_on(cluster_redis, total=2) for _ in range(3)]
    owners = {await _owner(cluster_redis, keys.CouponKeys(c.id).users) for c in coupons}
    assert len(owners) >= 2, "the coupons should live on more than one shard"
    responses = [await cluster_client.get(f"/v1/coupons/{c.id}/events") for c in coupons]
    feeds = [EventReader(response) for response in responses]
    for feed in feeds:
        first = await feed.next()
        assert first is not None
        assert (first.name, first.data["remaining"]) == ("snapshot", 2)
    for coupon in coupons:
        for user in (1, 2, 3):
            await issue(cluster_client, coupon.id, user)
    for feed in feeds:  # a sold-out published on any shard reaches the gateway's listener
        await feed.until("sold_out")
    for response in responses:
        response.close()
    await drain(cluster_redis, pool, cluster_settings)
    for coupon in coupons:
        await Checker(pool, cluster_redis)(coupon, accepted={1, 2}, rejected={3})


@pytest.fixture
def make_coupon_on(pool: Any) -> Any:
    """Create a coupon through the admin code path, on the cluster."""

    async def make(redis: Redis, total: int | None) -> Coupon:
        now = datetime.now(UTC)
        new = NewCoupon(
            title="cluster drop",
            total_quantity=total,
            discount_amount=0,
            min_available_amount=0,
            date_issue_start=now - timedelta(minutes=1),
            date_issue_end=now + timedelta(hours=1),
        )
        return await coupons.create_coupon(pool, redis, new, actor=TEST_ACTOR)

    return make


async def _owner(redis: Redis, key: str) -> str:
    """The shard (host:port) that owns ``key``'s hash slot."""
    node = redis.get_node_from_key(key)  # type: ignore[attr-defined]
    return f"{node.host}:{node.port}"
