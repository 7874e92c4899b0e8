"""The worker's heartbeat: its member of ``coupons:workers`` (:data:`shared.keys.WORKERS`).

A consumer group shows no consumer before the first request reaches it, so before a drop
nothing in the streams tells whether any worker is running. Each worker process therefore keeps
one member of a ZSET (its name, ``COUPON_WORKER_NAME``), scored with the Redis server time of
its last heartbeat (``heartbeat.lua``), refreshed every
:data:`~shared.redis.scripts.HEARTBEAT_INTERVAL_SECONDS`. It beats only while the worker's loop
turns: before the first turn and once the loop has not turned for ``COUPON_WORKER_STUCK_SECONDS``
(the ``/healthz`` rule) it stays silent, so its member goes stale and ``couponctl preflight``
stops counting it. A clean stop removes the member; a killed worker's member goes stale and is
dropped by the next heartbeat of any worker after an hour.

A small periodic task beside the worker loop, like the stream monitor; not run in burst mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.redis.scripts import HEARTBEAT_INTERVAL_SECONDS, Scripts

log = structlog.get_logger(__name__)

FIRST_TURN_POLL_SECONDS = 0.1
"""Until the first beat, how often to look whether the loop has turned, so that a worker just
started is counted at once rather than one interval later."""


class Heartbeat:
    """Keeps one worker's member of :data:`shared.keys.WORKERS` fresh while its loop turns."""

    def __init__(
        self,
        redis: Redis,
        name: str,
        since_turn: Callable[[], float | None],
        *,
        stuck_after_seconds: float,
        interval: float = HEARTBEAT_INTERVAL_SECONDS,
    ) -> None:
        """``since_turn()``: seconds since the worker's loop last turned, None before its first
        turn (:meth:`stream_worker.worker.Worker.seconds_since_turn`)."""
        self._redis = redis
        self._scripts = Scripts(redis)
        self._name = name
        self._since_turn = since_turn
        self._stuck_after = stuck_after_seconds
        self._interval = interval
        self.beats = 0
        """Heartbeats written."""
        self.skipped = 0
        """Ticks left silent because the loop had not turned (yet, or for too long)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every ``interval`` seconds until ``stop`` is set, then remove the member. A
        Redis failure is retried at the next tick (logged once per streak)."""
        failing = False
        while not stop.is_set():
            try:
                await self.beat()
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:
                    log.warning("worker_heartbeat_failed", consumer=self._name, error=repr(exc))
                failing = True
            else:
                if failing:
                    log.info("worker_heartbeat_recovered", consumer=self._name)
                failing = False
            wait = self._interval if self.beats else min(self._interval, FIRST_TURN_POLL_SECONDS)
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass
        await self.leave()

    async def beat(self) -> bool:
        """Refresh the member if the loop is turning; whether it was refreshed."""
        age = self._since_turn()
        if age is None or age > self._stuck_after:
            self.skipped += 1
            return False
        await self._scripts.heartbeat(self._name)
        self.beats += 1
        return True

    async def leave(self) -> None:
        """Remove the member: this worker no longer consumes. Best effort: should Redis not
        answer, the member goes stale by itself."""
        try:
            await self._redis.zrem(keys.WORKERS, self._name)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("worker_heartbeat_leave_failed", consumer=self._name, error=repr(exc))
