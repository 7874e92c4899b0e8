"""``COUPON_REDIS_MIN_REPLICAS``: a 202 only for what a replica holds, and no row for what it
does not, on a real primary and replica (the failovers themselves are fault tests F16-F18).

The replica is frozen with SIGSTOP here: it then sends no acknowledgements, so WAIT runs out.
(It does not put the replica behind for good, since the kernel keeps buffering the stream;
the failover tests cut the link instead, see tests/fault/link.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomysql
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway.app import create_app
from shared import keys, metrics
from shared.coupon_requests import NewCoupon
from shared.model import Coupon
from shared.ops import coupons
from shared.redis import client as redis_client
from shared.redis.scripts import Scripts
from shared.redis.state import check_guarantees
from shared.settings import ConfigError, Settings, parse_sentinels
from stream_worker.worker import Worker
from tests.helpers import TEST_ACTOR, assert_problem, issue, row_count, wait_for
from tests.invariants import Checker
from tests.servers import RedisServer


class Pair:
    def __init__(self, primary: RedisServer, replica: RedisServer) -> None:
        self.primary = primary
        self.replica = replica

    def freeze_replica(self) -> None:
        os.killpg(self.replica.pid, signal.SIGSTOP)

    def thaw_replica(self) -> None:
        os.killpg(self.replica.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    primary = RedisServer(Path(tmp_path_factory.mktemp("primary")))
    primary.start()
    replica = RedisServer(Path(tmp_path_factory.mktemp("replica")), replica_of=primary.port)
    try:
        replica.start()
        yield Pair(primary, replica)
    finally:
        os.killpg(replica.pid, signal.SIGCONT)
        replica.close()
        primary.close()


@pytest.fixture
async def replicated(pair: Pair, settings: Settings) -> AsyncIterator[tuple[Settings, Redis]]:
    """Settings on the pair's primary with COUPON_REDIS_MIN_REPLICAS=1, and a client of it
    (flushed, the replica in sync)."""
    changed = settings.replace(
        redis_url=pair.primary.url, redis_min_replicas=1, redis_replica_timeout_ms=100
    )
    client = redis_client.connect(changed.redis_url, socket_timeout=5.0)
    await client.flushall()
    replica = redis_client.connect(pair.replica.url, socket_timeout=5.0)

    async def in_sync() -> bool:
        info = await replica.info("replication")
        return bool(info.get("master_link_status") == "up") and not await replica.dbsize()

    await wait_for(in_sync, within=30)
    await replica.aclose()
    yield changed, client
    pair.thaw_replica()
    await client.aclose()


async def _coupon(pool: aiomysql.Pool, redis: Redis, total: int | None) -> Coupon:
    now = datetime.now(UTC)
    new = NewCoupon(
        title="replicated drop",
        total_quantity=total,
        discount_amount=1000,
        min_available_amount=10000,
        date_issue_start=now - timedelta(minutes=1),
        date_issue_end=now + timedelta(hours=1),
    )
    return await coupons.create_coupon(pool, redis, new, actor=TEST_ACTOR)


def _missing(path: str) -> float:
    return metrics.REPLICA_ACKS_MISSING.labels(path)._value.get()


async def test_a_202_only_once_the_replica_holds_the_reservation(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    pair: Pair,
    replicated: tuple[Settings, Redis],
    pool: aiomysql.Pool,
) -> None:
    settings, redis = replicated
    coupon = await _coupon(pool, redis, 10)
    client = await aiohttp_client(create_app(settings))
    replica = redis_client.connect(pair.replica.url, socket_timeout=5.0)
    users = keys.CouponKeys(coupon.id).users
    try:
        status, body = await issue(client, coupon.id, 1)
        assert status == 202, body
        # The 202 came after WAIT: the replica holds the slot already, not eventually.
        assert await replica.sismember(users, "1")

        before = _missing("reserve")
        pair.freeze_replica()
        response = await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 2})
        problem = await assert_problem(response, 503, "FAIL_COUPON_ISSUE_REQUEST")
        assert "outcome is unknown" in problem["detail"]
        assert "not confirmed by a Redis replica" in problem["title"]
        assert _missing("reserve") == before + 1
        # Reserved on the primary all the same: the status route tells the outcome.
        status_response = await client.get(f"/v1/coupons/{coupon.id}/issues/2")
        assert status_response.status == 200
        assert (await status_response.json())["status"] == "pending"
        # Rejections promise nothing a failover breaks: still answered at once.
        status, body = await issue(client, coupon.id, 1)
        assert (status, body["code"]) == (409, "DUPLICATED_COUPON_ISSUE")
    finally:
        pair.thaw_replica()
        await replica.aclose()
    await wait_for(lambda: replica_has(pair, users, "2"), within=10)
    status, body = await issue(client, coupon.id, 3)
    assert status == 202, body


async def replica_has(pair: Pair, key: str, member: str) -> bool:
    replica = redis_client.connect(pair.replica.url, socket_timeout=5.0)
    try:
        return bool(await replica.sismember(key, member))
    finally:
        await replica.aclose()


async def test_the_worker_writes_no_row_before_a_replica_holds_the_entry(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    pair: Pair,
    replicated: tuple[Settings, Redis],
    pool: aiomysql.Pool,
) -> None:
    settings, redis = replicated
    coupon = await _coupon(pool, redis, 10)
    client = await aiohttp_client(create_app(settings))
    pair.freeze_replica()
    try:
        response = await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 5})
        await assert_problem(response, 503, "FAIL_COUPON_ISSUE_REQUEST")
        worker = Worker(redis, pool, settings)
        before = _missing("worker")
        running = asyncio.create_task(worker.run())

        async def held_back_twice() -> bool:
            return _missing("worker") >= before + 2

        try:
            # The worker read the entry and asked twice: each time held back, no row.
            await wait_for(held_back_twice, within=10)
            assert await row_count(pool, coupon.id) == 0
            pair.thaw_replica()

            async def row_written() -> bool:
                return await row_count(pool, coupon.id) == 1

            await wait_for(row_written, within=10)
        finally:
            worker.stop()
            await running
    finally:
        pair.thaw_replica()
    snapshot = await Checker(pool, redis).snapshot(coupon.id)
    assert set(snapshot.rows) == {5}
    assert snapshot.pending == 0


async def test_start_warns_when_fewer_replicas_are_connected(
    pair: Pair, replicated: tuple[Settings, Redis]
) -> None:
    _, redis = replicated
    assert await check_guarantees(redis, min_replicas=1) == []
    (warning,) = await check_guarantees(redis, min_replicas=2)
    assert "1 replicas connected" in warning


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"redis_sentinels": "127.0.0.1:26379"}, "needs COUPON_REDIS_SENTINEL_MASTER"),
        ({"redis_sentinel_master": "coupon"}, "needs COUPON_REDIS_SENTINELS"),
        (
            {"redis_sentinels": "127.0.0.1:1", "redis_sentinel_master": "c", "redis_cluster": True},
            "exclude each other",
        ),
        ({"redis_sentinels": "127.0.0.1", "redis_sentinel_master": "c"}, "not host:port"),
        ({"redis_sentinels": "h:99999", "redis_sentinel_master": "c"}, "not host:port"),
        ({"redis_min_replicas": -1}, "COUPON_REDIS_MIN_REPLICAS"),
        ({"redis_replica_timeout_ms": 0}, "COUPON_REDIS_REPLICA_TIMEOUT_MS"),
        (
            {"redis_min_replicas": 1, "redis_replica_timeout_ms": 401},
            "at most 80 % of COUPON_REDIS_TIMEOUT_SECONDS",
        ),
        (
            {
                "redis_sentinels": "127.0.0.1:1",
                "redis_sentinel_master": "c",
                "redis_url": "rediss://127.0.0.1:6379/0",
            },
            "does not support rediss://",
        ),
    ],
)
def test_replication_settings_are_checked_at_start(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings(worker_name="w", **changes)  # type: ignore[arg-type]


def test_sentinel_addresses_parse() -> None:
    assert parse_sentinels(" 10.0.0.1:26379, [::1]:26380 ,") == (
        ("10.0.0.1", 26379),
        ("::1", 26380),
    )
    # The WAIT timeout is only bound by the socket timeout when WAIT is used.
    Settings(worker_name="w", redis_replica_timeout_ms=500)


async def test_a_claim_takes_only_entries_still_of_the_user_read(
    redis: Redis, pool: aiomysql.Pool, settings: Settings
) -> None:
    """After a failover the new primary may hold another user's request under an id a
    worker read from the old one (ids are time-based): claim.lua must not take it."""
    coupon = await _coupon(pool, redis, 10)
    stream = keys.CouponKeys(coupon.id).requests
    outcome = await Scripts(redis).reserve(coupon.id, [41, 42])
    first, second = (r.request_id for r in outcome.reservations)
    await redis.xreadgroup(keys.GROUP, "reader", {stream: ">"})
    scripts = Scripts(redis)
    claimed, confirmed = await scripts.claim_replicated(
        coupon.id, "me", [(first, 41), (second, 99), ("1-1", 41)]
    )
    assert (claimed, confirmed) == ({first}, True)
    (row,) = await redis.xpending_range(stream, keys.GROUP, min=first, max=first, count=1)
    assert row["consumer"] == "me"
    assert row["times_delivered"] == 1  # a re-claim is no delivery
    (other,) = await redis.xpending_range(stream, keys.GROUP, min=second, max=second, count=1)
    assert other["consumer"] == "reader"
