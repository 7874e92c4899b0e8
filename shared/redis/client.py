"""Redis clients configured for this service: one Redis, a primary found through Sentinel,
or a Redis Cluster."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import RedisError

from shared.settings import Settings

SENTINEL_RECHECK_SECONDS = 0.5
"""How often a pool asks the sentinels where the primary is, besides on every new connection
and right after a connection failed."""


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (each new connection asks the sentinels where the primary is) with the
    blocking pool's wait for a free connection, as the plain client has, and a fence against
    an old primary.

    redis-py asks the sentinels only when it opens a connection, so an idle connection to a
    primary that was frozen or cut off, and then came back after a promotion, would still be
    used: that primary accepts writes until the sentinels demote it, and they are lost then.
    So the pool also asks every :data:`SENTINEL_RECHECK_SECONDS` and after any failed
    connection; on a change it closes the idle connections (redis-py's own reaction), and a
    connection handed out still pointing at another address than the primary's is closed
    first, so the command reconnects through the sentinels.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._next_check = 0.0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + SENTINEL_RECHECK_SECONDS
            # Sentinels unreachable: keep using the primary we know (new connections will
            # fail on their own if it is gone).
            with contextlib.suppress(RedisError, OSError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        primary = self.master_address
        if primary and connection.is_connected and (connection.host, connection.port) != primary:
            try:
                # A plain reconnect would reuse the stored old address; the Sentinel
                # connection's connect() asks the sentinels.
                await connection.disconnect()
                await connection.connect()
            except BaseException:
                await self.release(connection)
                raise
        return connection

    async def release(self, connection: Any) -> None:
        if not connection.is_connected:
            self._next_check = 0.0
        await super().release(connection)


def for_settings(settings: Settings, *, socket_timeout: float, max_connections: int = 64) -> Redis:
    """The client a process's settings ask for: through Sentinel, to a Cluster, or plain."""
    if settings.redis_sentinel_addresses:
        assert settings.redis_sentinel_master is not None  # Settings checked it
        return connect_sentinel(
            settings.redis_sentinel_addresses,
            settings.redis_sentinel_master,
            url=settings.redis_url,
            sentinel_password=settings.redis_sentinel_password,
            socket_timeout=socket_timeout,
            max_connections=max_connections,
        )
    return connect(
        settings.redis_url,
        socket_timeout=socket_timeout,
        max_connections=max_connections,
        cluster=settings.redis_cluster,
    )


def _options(socket_timeout: float, max_connections: int) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), retries=0),
        "max_connections": max_connections,
        "health_check_interval": 0,
    }


def connect_sentinel(
    sentinels: Sequence[tuple[str, int]],
    master: str,
    *,
    url: str,
    sentinel_password: str | None,
    socket_timeout: float,
    max_connections: int = 64,
) -> Redis:
    """A client of the primary the sentinels name for ``master``.

    Every new connection asks the sentinels first, so after a promotion the client follows by
    itself: connections to the dead primary fail (a 503 for the request on them), the next
    ones go to the new primary, and one still open to an old primary that came back as a
    replica is dropped at its first READONLY reply. ``url`` gives the data nodes' password,
    user and database (its host and port are not used).
    """
    parts = parse_url(url)  # type: ignore[no-untyped-call]
    data_node = {key: parts[key] for key in ("username", "password", "db") if key in parts}
    sentinel_options = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), retries=0),
        "decode_responses": True,
        "password": sentinel_password,
    }
    manager = Sentinel(  # type: ignore[no-untyped-call]
        list(sentinels), sentinel_kwargs=sentinel_options
    )
    client = manager.master_for(
        master,
        redis_class=Redis,
        connection_pool_class=_BlockingSentinelPool,
        timeout=socket_timeout,
        **_options(socket_timeout, max_connections),
        **data_node,
    )
    return cast(Redis, client)


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
    options = _options(socket_timeout, max_connections)
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
