"""Acknowledging only what replicas hold: a write followed by ``WAIT`` on the connection that
made it.

Redis replicates asynchronously. A primary that dies takes with it what its replicas had not
received, and Sentinel or the Cluster then promotes a replica that never saw those writes: a
reservation answered 202 would be gone and its stock sold again. ``WAIT numreplicas timeout``
blocks the calling connection until that many replicas acknowledged every write the
connection made so far, and answers how many did. It counts per connection, so the write and
its ``WAIT`` go out as one pipeline on one connection (on a Cluster, to the node that owns the
key): one round trip, and no other client's writes in between can make it answer too early or
too late.

``WAITAOF`` (Redis 7.2) would also wait for the replicas' AOF fsync. It is not used: the Redis
this project is built and tested on (Debian's 7.0) lacks it, and it never succeeds against
replicas that run without AOF. ``WAIT`` closes the failover window, which is the loss that
happens: a promoted replica holds every write it acknowledged in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster

from shared import metrics
from shared.redis.client import is_cluster
from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class Replicated:
    """A write's reply and whether the replicas it had to reach acknowledged it in time."""

    reply: Any
    confirmed: bool


class ReplicaWait:
    """Runs one write and then ``WAIT replicas timeout_ms`` on the same connection.

    Only for ``replicas`` ≥ 1 (:meth:`for_settings` gives None for 0: the promise is then only
    the primary's, and its AOF's, and the writes run as plain calls).
    """

    def __init__(self, redis: Redis, *, replicas: int, timeout_ms: int, path: str) -> None:
        assert replicas > 0
        self._redis = redis
        self._wait: tuple[Any, ...] = ("WAIT", replicas, timeout_ms)
        self._replicas = replicas
        self._cluster = is_cluster(redis)
        self._short = metrics.REPLICA_ACKS_MISSING.labels(path)

    @classmethod
    def for_settings(cls, redis: Redis, settings: Settings, *, path: str) -> ReplicaWait | None:
        """What ``COUPON_REDIS_MIN_REPLICAS`` asks of the writes on ``path`` (a label of
        ``coupon_replica_acks_missing_total``); None when it asks for nothing."""
        if not settings.redis_min_replicas:
            return None
        return cls(
            redis,
            replicas=settings.redis_min_replicas,
            timeout_ms=settings.redis_replica_timeout_ms,
            path=path,
        )

    async def run(self, key: str, *command: Any) -> Replicated:
        """Send one write ``command`` (``key`` is the key it works on) and the ``WAIT``
        together. Raises the command's own error; a ``WAIT`` that fails counts as not
        confirmed (the write may still have happened: the outcome is unknown)."""
        wait = self._wait
        async with self._redis.pipeline(transaction=False) as pipe:
            if self._cluster:
                # Both pinned to the node that owns the key now, so they share its connection
                # (routing the write by its key at execute() could pick a newer owner after a
                # topology refresh). A redirection would send the write again on another
                # connection, and WAIT here would count nothing of it: MOVED stays an error.
                node = cast(RedisCluster, self._redis).get_node_from_key(key)
                pipe.execute_command(*command, target_nodes=node)
                pipe.execute_command(*wait, target_nodes=node)
                reply, acked = await pipe.execute(  # type: ignore[call-arg]
                    raise_on_error=False, allow_redirections=False
                )
            else:
                pipe.execute_command(*command)
                pipe.execute_command(*wait)
                reply, acked = await pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply
        confirmed = isinstance(acked, int) and acked >= self._replicas
        if not confirmed:
            self._short.inc()
        return Replicated(reply, confirmed=confirmed)
