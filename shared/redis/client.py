"""Redis clients configured for this service: one Redis, or a Redis Cluster."""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(
    url: str, *, socket_timeout: float, max_connections: int = 64, cluster: bool = False
) -> Redis:
    """A client that never retries on its own.

    redis-py retries timed-out commands silently by default. A retried reservation could run
    twice and answer "duplicate" to the user it just accepted, so every retry is ours to decide.
    On a cluster this also means a MOVED reply during a resharding surfaces as an error (a 503
    for the client, whose retry then finds the new owner) instead of a silent second attempt.

    With ``cluster`` the URL names any node of a Redis Cluster; every key of one coupon shares
    a hash slot, so each script and transaction runs on one shard.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), retries=0),
        "max_connections": max_connections,
        "health_check_interval": 0,
    }
    if cluster:
        # RedisCluster offers the same command methods with the same signatures (it routes
        # each by its key), so the rest of the code is written against one interface.
        return cast(Redis, RedisCluster.from_url(url, **options))
    # A burst beyond the pool's size waits (at most the socket timeout) for a free connection
    # instead of failing at once with "Too many connections".
    pool = BlockingConnectionPool.from_url(url, timeout=socket_timeout, **options)
    client = Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() closes the pool it owns
    return client


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


async def info_per_node(redis: Redis, section: str) -> list[dict[str, Any]]:
    """An INFO section's fields, one dict per node: a single Redis answers one dict of fields,
    a cluster client a dict of them per node."""
    info: Any = await redis.info(section)
    per_node = bool(info) and all(isinstance(value, dict) for value in info.values())
    return list(info.values()) if per_node else [info]
