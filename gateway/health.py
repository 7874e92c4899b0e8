"""What ``/readyz`` reports: the gateway is ready when it can accept, which needs Redis and the
state Redis holds, never MySQL (acceptance does not wait for it, and the fault suite's MariaDB
outage shows the gateway accepting throughout). MySQL's state is reported beside it, in the body
and as ``coupon_gateway_mysql_up``, because the sync route and the admin API do need it: a
Kubernetes readiness probe that failed on MySQL would take every gateway out of service during a
MySQL outage, and with them every acceptance.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomysql
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys, metrics
from shared.mysql.pool import answers

log = structlog.get_logger(__name__)

CHECK_TIMEOUT_SECONDS = 1.0
MYSQL_CHECK_INTERVAL_SECONDS = 5.0
"""How often the MySQL gauge is refreshed between probes (a scrape sees at most this old)."""


async def redis_state(redis: Redis) -> str:
    """``ok``, ``state_lost`` (Redis answers but lost the service's data) or ``unreachable``."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            return "ok" if await redis.exists(keys.STATE_MARKER) else "state_lost"
    except (RedisError, OSError, TimeoutError):
        return "unreachable"  # the exception's class is for the log, not the world


async def mysql_state(pool: aiomysql.Pool) -> str:
    """``ok`` or ``unreachable``; the gauge follows."""
    up = await answers(pool)
    metrics.GATEWAY_MYSQL_UP.set(int(up))
    return "ok" if up else "unreachable"


async def readiness(redis: Redis, pool: aiomysql.Pool) -> tuple[bool, dict[str, Any]]:
    """Whether to take traffic, and the body that says why."""
    checks = {"redis": await redis_state(redis), "mysql": await mysql_state(pool)}
    ready = checks["redis"] == "ok"
    return ready, {"ready": ready, **checks}


async def watch_mysql(pool: aiomysql.Pool, stop: asyncio.Event) -> None:
    """Keep ``coupon_gateway_mysql_up`` fresh between readiness probes, until ``stop``."""
    last = "ok"
    while not stop.is_set():
        state = await mysql_state(pool)
        if state != last:
            log.warning("mysql_state_changed", mysql=state)
            last = state
        try:
            await asyncio.wait_for(stop.wait(), MYSQL_CHECK_INTERVAL_SECONDS)
        except TimeoutError:
            pass
