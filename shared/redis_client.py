"""Redis clients configured for this service."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(url: str, *, socket_timeout: float, max_connections: int = 64) -> Redis:
    """A client that never retries on its own.

    redis-py retries timed-out commands silently by default. A retried reservation could run
    twice and answer "duplicate" to the user it just accepted, so every retry is ours to decide.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), retries=0),
        max_connections=max_connections,
        health_check_interval=0,
    )
