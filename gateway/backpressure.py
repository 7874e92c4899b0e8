"""Load shedding, decided before anything is reserved.

Two signals, both cheap on the hot path (a dict lookup and a counter):

- the pipeline's health, per coupon: a background task reads how far the workers are behind
  (entries not yet delivered, and the age of the oldest unsettled entry, which also grows while
  MySQL is down and batches are being retried). Past a threshold the gateway answers 503 with
  Retry-After instead of piling up promises the workers cannot keep in time;
- the gateway's own queue: while the oldest request waiting for a reservation in this process
  has waited longer than a target for a whole interval (a standing queue, not a burst), new
  ones get 503 at once, so an overload cannot grow latency without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared import keys
from shared.errors import Overloaded, PipelineBehind

log = structlog.get_logger(__name__)


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


class PipelineHealth:
    """Which coupons' streams are too far behind to accept more; refreshed in the background."""

    def __init__(
        self, redis: Redis, *, max_lag: int, max_age_seconds: float, interval: float = 0.5
    ) -> None:
        self._redis = redis
        self._max_lag = max_lag
        self._max_age_ms = int(max_age_seconds * 1000)
        self._interval = interval
        self._behind: dict[int, str] = {}

    @property
    def enabled(self) -> bool:
        return self._max_lag > 0 or self._max_age_ms > 0

    def check(self, coupon_id: int) -> None:
        """Raise :class:`PipelineBehind` when this coupon's stream is past a threshold."""
        reason = self._behind.get(coupon_id)
        if reason is not None:
            raise PipelineBehind(f"coupon {coupon_id}: {reason}; retry shortly")

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until ``stop`` is set. Errors keep the last view (Redis trouble is answered
        by the reservation path itself)."""
        while self.enabled and not stop.is_set():
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                log.warning("pipeline_health_refresh_failed", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), self._interval)
            except TimeoutError:
                pass

    async def refresh(self) -> None:
        behind: dict[int, str] = {}
        ids = [int(raw) for raw in await self._redis.smembers(keys.ACTIVE_COUPONS)]
        now_s, now_us = await self._redis.time()
        now_ms = now_s * 1000 + now_us // 1000
        for coupon_id in ids:
            reason = await self._judge(keys.CouponKeys(coupon_id).requests, now_ms)
            if reason is not None:
                behind[coupon_id] = reason
        if behind.keys() != self._behind.keys():
            log.warning("pipeline_shedding", coupons=sorted(behind), reasons=behind)
        self._behind = behind

    async def _judge(self, stream: str, now_ms: int) -> str | None:
        try:
            groups = await self._redis.xinfo_groups(stream)
        except ResponseError:  # the stream does not exist yet
            return None
        group = next((g for g in groups if g["name"] == keys.GROUP), None)
        if group is None:
            return None
        lag = int(group.get("lag") or 0)
        if self._max_lag and lag > self._max_lag:
            return f"{lag} requests wait for a worker"
        if not self._max_age_ms:
            return None
        oldest: list[str] = []
        summary = await self._redis.xpending(stream, keys.GROUP)
        if summary and summary.get("min"):
            oldest.append(str(summary["min"]))
        if lag:
            first: Any = await self._redis.xrange(
                stream, min="(" + str(group["last-delivered-id"]), max="+", count=1
            )
            oldest.extend(str(entry_id) for entry_id, _ in first)
        if oldest:
            age_ms = now_ms - min(_entry_ms(entry_id) for entry_id in oldest)
            if age_ms > self._max_age_ms:
                return f"the oldest unsettled request is {age_ms / 1000:.0f} s old"
        return None


class WaitAdmission:
    """Sheds new reservations while the process's reservation queue stands (CoDel-like).

    The signal is how long the oldest request waiting for its reservation has waited (queued
    behind a coupon's call in flight, or in that call). A burst makes a queue that drains by
    itself; only a queue whose oldest request stays older than ``target`` for a whole
    ``interval`` without a break means more arrives than the process can serve (the idea of
    CoDel, Nichols and Jacobson, 2012). Then new requests get 503 before anything is reserved,
    until the oldest wait falls under the target again. A count of requests in flight cannot
    tell the two apart: it refuses a burst of cheap requests that would all be served within
    milliseconds.
    """

    def __init__(
        self,
        oldest_wait: Callable[[float], float],
        *,
        target_seconds: float,
        interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._oldest_wait = oldest_wait
        self._target = target_seconds
        self._interval = interval_seconds
        self._clock = clock
        self._above_since: float | None = None

    def check(self) -> None:
        """Raise :class:`Overloaded` while the queue has stood above the target too long."""
        if not self._target:
            return
        now = self._clock()
        wait = self._oldest_wait(now)
        if wait < self._target:
            self._above_since = None
            return
        if self._above_since is None:
            self._above_since = now
        if now - self._above_since >= self._interval:
            raise Overloaded(
                f"requests wait {wait * 1000:.0f} ms for a reservation (target"
                f" {self._target * 1000:.0f} ms); retry shortly"
            )
