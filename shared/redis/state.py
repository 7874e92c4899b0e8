"""What the service requires of its Redis, checked at start, and the marker that tells a Redis
that lost its data apart from one that never had any."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from redis.asyncio import Redis

from shared import keys
from shared.redis.client import info_per_node
from shared.settings import ConfigError

log = structlog.get_logger(__name__)


async def check_guarantees(redis: Redis, *, min_replicas: int = 0) -> list[str]:
    """Refuse a Redis that may evict keys; return warnings for weaker durability, and for a
    primary with fewer replicas connected than ``min_replicas`` (every acceptance would be a
    503 "outcome unknown" until they are back).

    Uses INFO rather than CONFIG GET, which managed Redis services often disable. An evicted
    dedup set or stream would resell coupons or lose accepted requests, so eviction is fatal;
    without AOF a Redis crash loses the requests accepted since the last snapshot, which the
    operator may accept knowingly, so that only warns.
    """
    memory = await redis.info("memory")
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        raise ConfigError(
            f"Redis maxmemory-policy is {policy!r}; it must be 'noeviction' or accepted requests"
            " and dedup sets could be evicted"
        )
    persistence = await redis.info("persistence")
    warnings = []
    if str(persistence.get("aof_enabled", "0")) != "1":
        warnings.append("Redis AOF is off: a Redis crash loses accepted requests (appendonly yes)")
    if min_replicas:
        for node in await info_per_node(redis, "replication"):
            connected = int(node.get("connected_slaves", 0))
            if node.get("role") == "master" and connected < min_replicas:
                warnings.append(
                    f"a Redis primary has {connected} replicas connected, fewer than"
                    f" COUPON_REDIS_MIN_REPLICAS={min_replicas}: reservations get 503 until"
                    " enough replicas are back"
                )
    return warnings


async def mark_initialised(redis: Redis) -> None:
    """Record that this Redis holds the service's state (idempotent)."""
    await redis.set(keys.STATE_MARKER, datetime.now(UTC).isoformat(), nx=True)


async def state_present(redis: Redis, any_coupon: Callable[[], Awaitable[bool]]) -> bool:
    """True when Redis holds the state, or the system of record has no coupons yet (a fresh
    system, which it then marks). False when ``any_coupon()`` says MySQL has coupons but Redis
    lost the marker: state lost. (MySQL is asked through the callable, so this Redis module
    needs no MySQL code.)

    A Redis that has no marker but still knows active coupons holds data written before the
    marker existed (an upgrade), not an empty restart: it is marked too.
    """
    if await redis.exists(keys.STATE_MARKER):
        return True
    if await redis.scard(keys.ACTIVE_COUPONS):
        await mark_initialised(redis)
        return True
    if await any_coupon():
        return False
    await mark_initialised(redis)
    return True
