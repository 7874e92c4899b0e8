"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiomysql
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from shared.settings import Settings
from stream_worker.worker import Worker

ADMIN = {"Authorization": "Bearer test-admin-token-0123456789"}


async def drain(redis: Redis, pool: aiomysql.Pool, settings: Settings, **changes: Any) -> None:
    """Run a worker in burst mode until nothing is left to do."""
    await Worker(redis, pool, settings.replace(**changes) if changes else settings).run(burst=True)


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, within: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def issue(
    client: TestClient[Any, Any], coupon_id: int, user_id: int
) -> tuple[int, dict[str, Any]]:
    response = await client.post(f"/v1/coupons/{coupon_id}/issues", json={"user_id": user_id})
    return response.status, await response.json(content_type=None)


async def row_count(pool: aiomysql.Pool, coupon_id: int) -> int:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM coupon_issues WHERE coupon_id = %s", (coupon_id,))
        (count,) = await cur.fetchone()
        await conn.rollback()
    return int(count)
