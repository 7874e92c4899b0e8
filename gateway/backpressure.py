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

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.errors import Overloaded, PipelineBehind
from shared.redis.coupon_state import active_coupon_ids
from shared.redis.streams import Backlog, backlogs, redis_now_ms

log = structlog.get_logger(__name__)


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

    @property
    def behind(self) -> dict[int, str]:
        """The coupons shed now, each with the reason (the operator console shows them)."""
        return dict(self._behind)

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
        ids = await active_coupon_ids(self._redis)
        now_ms = await redis_now_ms(self._redis)
        behind: dict[int, str] = {}
        for coupon_id, backlog in (await backlogs(self._redis, ids)).items():
            reason = self._judge(backlog, now_ms)
            if reason is not None:
                behind[coupon_id] = reason
        if behind.keys() != self._behind.keys():
            log.warning("pipeline_shedding", coupons=sorted(behind), reasons=behind)
        self._behind = behind

    def _judge(self, backlog: Backlog, now_ms: int) -> str | None:
        if self._max_lag and backlog.lag > self._max_lag:
            return f"{backlog.lag} requests wait for a worker"
        age_ms = 1000 * backlog.oldest_age_seconds(now_ms)
        if self._max_age_ms and age_ms > self._max_age_ms:
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
