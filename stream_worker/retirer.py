"""Automatic retirement: finished coupons leave Redis ``COUPON_RETIRE_AFTER_SECONDS`` after
their window ends, once everything they accepted is settled (see :mod:`shared.ops.retire`).

A periodic task beside the worker loop, in every worker: the coupon's MySQL row lock makes the
workers take turns, and a coupon one of them retired is simply gone for the others. A coupon
that is not settled yet (MySQL down, a request still pending) is tried again at the next tick.
"""

from __future__ import annotations

import asyncio

import aiomysql
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.errors import AppError, Conflict
from shared.ops.audit import Actor
from shared.ops.retire import retire_coupon
from shared.redis.coupon_state import active_coupon_ids
from shared.redis.streams import redis_now_ms

log = structlog.get_logger(__name__)

# How often a worker looks for coupons to retire: retirement is housekeeping, not urgent.
RETIRE_CHECK_SECONDS = 30.0


class Retirer:
    """Retires the active coupons whose window ended long enough ago."""

    def __init__(
        self, redis: Redis, pool: aiomysql.Pool, *, after_seconds: float, worker_name: str
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._after_seconds = after_seconds
        self._actor = Actor(worker_name, "worker")

    async def run(self, stop: asyncio.Event, interval: float = RETIRE_CHECK_SECONDS) -> None:
        while not stop.is_set():
            try:
                await self.retire_due()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("retire_check_failed", error=repr(exc))
            except Exception:  # housekeeping must never take the worker down
                log.exception("retire_check_error")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass

    async def retire_due(self) -> list[int]:
        """Retire every coupon that is due; returns the ids retired by this call."""
        ids = await active_coupon_ids(self._redis)
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for coupon_id in ids:
                pipe.hget(keys.CouponKeys(coupon_id).meta, "end_ms")
            ends = await pipe.execute()
        now_ms = await redis_now_ms(self._redis)
        due = [
            coupon_id
            for coupon_id, end in zip(ids, ends, strict=True)
            if end is not None and now_ms >= int(end) + self._after_seconds * 1000
        ]
        retired = []
        for coupon_id in sorted(due):
            try:
                done = await retire_coupon(
                    self._pool,
                    self._redis,
                    coupon_id,
                    actor=self._actor,
                    after_end_seconds=self._after_seconds,
                )
            except Conflict as exc:  # not settled yet: the next tick tries again
                log.info("retire_postponed", coupon_id=coupon_id, reason=str(exc))
            except AppError as exc:  # no such coupon in MySQL, or Redis lost its state
                log.warning("retire_refused", coupon_id=coupon_id, reason=str(exc))
            else:
                if not done.already:
                    retired.append(coupon_id)
        return retired
