"""Per-coupon stream gauges for dashboards: lag, pending, oldest-pending age, remaining stock.

A small periodic task beside the worker loop. It reads, for every active coupon, the consumer
group's ``XINFO GROUPS`` entry (lag: accepted requests not yet delivered), the ``XPENDING``
summary (delivered, not yet acknowledged) and the stock counters, in two pipelined round trips
per interval whatever the number of coupons. Ages are measured on Redis server time (entry ids
are Redis milliseconds), so a worker with a skewed clock still reports true ages.

Every worker runs one; they all see the same streams, so dashboards take ``max`` over
instances. Only the :data:`~shared.metrics.MAX_COUPON_SERIES` busiest coupons get their own
``coupon`` label; the others are summed under ``coupon="other"``, so the number of series stays
bounded however many coupons exist.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys, metrics

log = structlog.get_logger(__name__)

OTHER = "other"
"""The ``coupon`` label value under which coupons past the series limit are summed."""

# Without a "lag" field (Redis before 7, or after entries were deleted) the undelivered
# entries are counted by reading them, up to this many.
_LAG_COUNT_LIMIT = 10_000

_GAUGES = (
    metrics.STREAM_LAG,
    metrics.STREAM_PENDING,
    metrics.STREAM_OLDEST_PENDING_SECONDS,
    metrics.COUPON_REMAINING,
)


@dataclass(frozen=True, slots=True)
class StreamState:
    """One coupon's request stream as the monitor measured it."""

    coupon_id: int
    lag: int
    """Accepted requests no worker has read yet."""
    pending: int
    """Requests read by a worker and not yet acknowledged (not yet committed to MySQL)."""
    oldest_age_seconds: float
    """How long the oldest accepted request not yet acknowledged has waited (0 when none)."""
    remaining: int | None
    """Stock left to reserve; None for an unlimited coupon."""

    @property
    def backlog(self) -> int:
        return self.lag + self.pending


def _entry_ms(entry_id: str) -> int:
    # Stream entry ids are "<redis ms>-<seq>".
    return int(entry_id.partition("-")[0])


class StreamMonitor:
    """Measures every active coupon's stream and publishes the gauges."""

    def __init__(
        self,
        redis: Redis,
        *,
        interval: float,
        max_series: int = metrics.MAX_COUPON_SERIES,
    ) -> None:
        self._redis = redis
        self._interval = interval
        self._max_series = max_series
        self._labelled: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Measure every ``interval`` seconds until ``stop`` is set; a failure is retried at
        the next tick (and logged once per streak, not once per tick)."""
        failing = False
        while not stop.is_set():
            try:
                await self.collect()
            except (RedisError, OSError, TimeoutError) as exc:
                metrics.STREAM_MONITOR_UP.set(0)
                if not failing:
                    log.warning("stream_monitor_failed", error=repr(exc))
                failing = True
            except Exception:
                # A measurement bug must not take the worker down with it: the gauges go
                # stale, the "up" gauge says so, and the worker keeps committing.
                metrics.STREAM_MONITOR_UP.set(0)
                if not failing:
                    log.exception("stream_monitor_error")
                failing = True
            else:
                if failing:
                    log.info("stream_monitor_recovered")
                failing = False
            try:
                await asyncio.wait_for(stop.wait(), self._interval)
            except TimeoutError:
                pass

    async def collect(self) -> list[StreamState]:
        """Measure once, publish the gauges, and return the measurements."""
        coupon_ids = sorted(int(raw) for raw in await self._redis.smembers(keys.ACTIVE_COUPONS))
        clock: Any = await self._redis.time()
        if isinstance(clock, dict):  # a cluster client answers once per node
            clock = next(iter(clock.values()))
        seconds, micros = clock
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        states = await self._measure(coupon_ids, now_ms)
        self._publish(states)
        metrics.STREAM_MONITOR_UP.set(1)
        return states

    async def _measure(self, coupon_ids: list[int], now_ms: int) -> list[StreamState]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for coupon_id in coupon_ids:
                k = keys.CouponKeys(coupon_id)
                pipe.xinfo_groups(k.requests)
                pipe.xpending(k.requests, keys.GROUP)
                pipe.hget(k.meta, "total")
                pipe.scard(k.users)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        groups: dict[int, dict[str, Any] | None] = {}
        summaries: dict[int, Any] = {}
        stock: dict[int, int | None] = {}
        for index, coupon_id in enumerate(coupon_ids):
            infos, summary, total, reserved = replies[index * 4 : index * 4 + 4]
            # A coupon whose stream or group is missing has nothing waiting; XINFO answers an
            # error for a missing stream, which the pipeline hands back as a value.
            info_list = infos if isinstance(infos, list) else []
            groups[coupon_id] = next((g for g in info_list if g.get("name") == keys.GROUP), None)
            summaries[coupon_id] = summary if isinstance(summary, dict) else None
            stock[coupon_id] = _remaining(total, reserved)
        first_undelivered = await self._first_undelivered(groups)
        states = []
        for coupon_id in coupon_ids:
            group = groups[coupon_id]
            summary = summaries[coupon_id]
            pending = int(summary["pending"]) if summary else 0
            lag, oldest_new = first_undelivered.get(coupon_id, (0, None))
            waiting_since = [
                _entry_ms(summary["min"]) if summary and pending and summary["min"] else None,
                oldest_new,
            ]
            known = [ms for ms in waiting_since if ms is not None]
            age = max(now_ms - min(known), 0) / 1000 if known else 0.0
            states.append(
                StreamState(
                    coupon_id=coupon_id,
                    lag=lag if group is not None else 0,
                    pending=pending,
                    oldest_age_seconds=age,
                    remaining=stock[coupon_id],
                )
            )
        return states

    async def _first_undelivered(
        self, groups: dict[int, dict[str, Any] | None]
    ) -> dict[int, tuple[int, int | None]]:
        """coupon id -> (lag, Redis ms of the oldest entry not yet delivered, if any)."""
        waiting = {
            coupon_id: group
            for coupon_id, group in groups.items()
            if group is not None and (group.get("lag") is None or int(group["lag"]) > 0)
        }
        if not waiting:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for coupon_id, group in waiting.items():
                stream = keys.CouponKeys(coupon_id).requests
                after = f"({group['last-delivered-id']}"
                count = 1 if group.get("lag") is not None else _LAG_COUNT_LIMIT
                pipe.xrange(stream, min=after, max="+", count=count)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        found: dict[int, tuple[int, int | None]] = {}
        for (coupon_id, group), entries in zip(waiting.items(), replies, strict=True):
            listed = entries if isinstance(entries, list) else []
            lag = int(group["lag"]) if group.get("lag") is not None else len(listed)
            found[coupon_id] = (lag, _entry_ms(listed[0][0]) if listed else None)
        return found

    def _publish(self, states: list[StreamState]) -> None:
        ranked = sorted(states, key=lambda s: (s.backlog, s.coupon_id), reverse=True)
        own, rest = ranked[: self._max_series], ranked[self._max_series :]
        labelled: set[str] = set()
        for state in own:
            label = str(state.coupon_id)
            labelled.add(label)
            metrics.STREAM_LAG.labels(label).set(state.lag)
            metrics.STREAM_PENDING.labels(label).set(state.pending)
            metrics.STREAM_OLDEST_PENDING_SECONDS.labels(label).set(state.oldest_age_seconds)
            if state.remaining is None:
                _remove(metrics.COUPON_REMAINING, label)
            else:
                metrics.COUPON_REMAINING.labels(label).set(state.remaining)
        if rest:
            labelled.add(OTHER)
            metrics.STREAM_LAG.labels(OTHER).set(sum(s.lag for s in rest))
            metrics.STREAM_PENDING.labels(OTHER).set(sum(s.pending for s in rest))
            metrics.STREAM_OLDEST_PENDING_SECONDS.labels(OTHER).set(
                max(s.oldest_age_seconds for s in rest)
            )
        # Coupons that left the top list (or "other", once it is empty) stop being reported.
        for label in self._labelled - labelled:
            for gauge in _GAUGES:
                _remove(gauge, label)
        self._labelled = labelled


def _remaining(total: Any, reserved: Any) -> int | None:
    if not isinstance(total, str) or not isinstance(reserved, int):
        return None
    limit = int(total)
    return None if limit < 0 else max(limit - reserved, 0)


def _remove(gauge: Any, label: str) -> None:
    try:
        gauge.remove(label)
    except KeyError:
        pass
