"""Per-coupon stream gauges for dashboards: lag, pending, oldest-pending age, remaining stock,
and the accepted requests that are unaccounted for.

A small periodic task beside the worker loop. It reads, for every active coupon, the consumer
group's ``XINFO GROUPS`` entry (lag: accepted requests not yet delivered), the ``XPENDING``
summary (delivered, not yet acknowledged), the stock counters and the balance below, in four
pipelined round trips per interval whatever the number of coupons
(:func:`shared.redis.streams.backlogs`, :func:`shared.redis.streams.balances`).
Ages are measured on Redis server time (entry ids are Redis milliseconds), so a worker with a
skewed clock still reports true ages.

Every worker runs one; they all see the same streams, so dashboards take ``max`` over
instances. Only the :data:`~shared.metrics.MAX_COUPON_SERIES` busiest coupons get their own
``coupon`` label; the others are summed under ``coupon="other"``, so the number of series stays
bounded however many coupons exist.

**The standing check of I5** (every accepted request is exactly one of issued, pending or
dead-lettered): ``coupon_requests_unaccounted`` = accepted − issued − pending − dead-lettered −
correction, per coupon, from Redis alone (:func:`shared.redis.streams.balances`, one more
pipelined round trip): accepted is the stream's ``entries-added``, issued ``SCARD
{coupon:ID}:issued``, pending the group's lag plus its delivered-unacknowledged entries, dead
``XLEN {coupon:ID}:dead``, correction ``{coupon:ID}:correction``. What was verified:

- *Atomic settlements.* The worker's MySQL COMMIT and its Redis step cannot be one (two
  stores), but after the COMMIT the issued mark (``SADD :issued``) and the ``XACK`` are one
  MULTI per coupon (``Worker._acknowledge``; ``couponctl dead release`` finishing a committed
  request does the same): until it runs the entry counts as pending only, after it as issued
  only. A dead letter is one script (``release.lua``: XADD ``:dead`` + XACK), a reservation one
  script (``issue.lua``: the slot + XADD). And the monitor reads all the terms of one coupon in
  one script (``balance.lua``), so no settlement falls between two reads: the value is exact,
  with no transient bump while a drop runs; the alert's ``for:`` only rides out a repair.
- *The synchronous route* (``POST /v1/issue``) commits its own row but marks its user in
  ``:sync_issued`` (for the status route), not ``:issued``: the issued mark comes with the
  worker's acknowledgement of the entry (``already_issued``), as for every request.
- *Dead-letter replay* keeps the dead letter (still counted dead) and adds a new entry
  (accepted + 1, pending + 1, later issued + 1): closed at every step.
- *Reconcile repair* re-queues a lost request (``accepted_missing``) as a new entry; the lost
  original stays in the stream, settled without a row, so the same MULTI adds 1 to the
  correction.
- *Rebuild* after Redis lost its data restarts the stream empty (entries-added 0) and restores
  the issued marks from MySQL; every mark it adds for a row with no request in the stream takes
  1 off the correction in the same MULTI, so the balance is 0 again, and drift that was there
  before a rebuild of a surviving stream stays visible.

A value above 0 means accepted requests that became nothing: no row, no dead letter, not in
the stream's backlog (an acknowledgement without its row; ``couponctl reconcile ID`` names them
as ``accepted_missing`` and ``--repair`` re-queues them). A value below 0 never means "fine":
something is counted twice (an issued mark or a dead letter beyond the stream's requests).
Briefly so after a rebuild on a live stream, which marks users whose committed request a worker
has not acknowledged yet (back to 0 at the acknowledgement); for good only when Redis was
written by hand, which ``couponctl reconcile ID`` shows. ``coupon="other"`` sums the positive
values only, so a coupon counted twice cannot hide another's lost request. Where Redis cannot
count (before 7.0, or entries deleted from the stream) the coupon's series is left out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys, metrics
from shared.redis import client as redis_client
from shared.redis.coupon_state import active_coupon_ids
from shared.redis.streams import backlogs, balances, redis_now_ms

log = structlog.get_logger(__name__)

OTHER = "other"
"""The ``coupon`` label value under which coupons past the series limit are summed."""

_GAUGES = (
    metrics.STREAM_LAG,
    metrics.STREAM_PENDING,
    metrics.STREAM_OLDEST_PENDING_SECONDS,
    metrics.COUPON_REMAINING,
    metrics.REQUESTS_UNACCOUNTED,
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
    unaccounted: int | None = None
    """Accepted requests neither issued, pending nor dead-lettered (0 when all are accounted
    for, below 0 when something is counted twice); None where Redis cannot count them."""

    @property
    def backlog(self) -> int:
        return self.lag + self.pending


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
        self._uncountable_logged = False

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
        coupon_ids = await active_coupon_ids(self._redis)
        now_ms = await redis_now_ms(self._redis)
        waiting = await backlogs(self._redis, coupon_ids)
        stock = await self._remaining(coupon_ids)
        balance = await balances(self._redis, coupon_ids)
        states = [
            StreamState(
                coupon_id=coupon_id,
                lag=waiting[coupon_id].lag,
                pending=waiting[coupon_id].pending,
                oldest_age_seconds=waiting[coupon_id].oldest_age_seconds(now_ms),
                remaining=stock[coupon_id],
                unaccounted=None if (b := balance[coupon_id]) is None else b.unaccounted,
            )
            for coupon_id in coupon_ids
        ]
        uncountable = [s.coupon_id for s in states if s.unaccounted is None]
        if uncountable and not self._uncountable_logged:
            log.warning("requests_unaccounted_not_measurable", coupon_ids=uncountable[:10])
        self._uncountable_logged = bool(uncountable)
        self._publish(states)
        await self._measure_memory()
        metrics.STREAM_MONITOR_UP.set(1)
        return states

    async def _measure_memory(self) -> None:
        """Redis's memory against its limit: under ``noeviction`` (which the service requires)
        a full Redis refuses every write, so every reservation would be a 503."""
        nodes = await redis_client.info_per_node(self._redis, "memory")
        used = max(int(node.get("used_memory", 0)) for node in nodes)
        limit = max(int(node.get("maxmemory", 0)) for node in nodes)
        metrics.REDIS_USED_MEMORY_BYTES.set(used)
        metrics.REDIS_MAXMEMORY_BYTES.set(limit)

    async def _remaining(self, coupon_ids: list[int]) -> dict[int, int | None]:
        """coupon id -> stock left to reserve (None: unlimited, or no snapshot)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for coupon_id in coupon_ids:
                k = keys.CouponKeys(coupon_id)
                pipe.hget(k.meta, "total")
                pipe.scard(k.users)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return {
            coupon_id: _remaining(replies[2 * index], replies[2 * index + 1])
            for index, coupon_id in enumerate(coupon_ids)
        }

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
            if state.unaccounted is None:
                _remove(metrics.REQUESTS_UNACCOUNTED, label)
            else:
                metrics.REQUESTS_UNACCOUNTED.labels(label).set(state.unaccounted)
        if rest:
            labelled.add(OTHER)
            metrics.STREAM_LAG.labels(OTHER).set(sum(s.lag for s in rest))
            metrics.STREAM_PENDING.labels(OTHER).set(sum(s.pending for s in rest))
            metrics.STREAM_OLDEST_PENDING_SECONDS.labels(OTHER).set(
                max(s.oldest_age_seconds for s in rest)
            )
            # Positive values only: a coupon counted twice must not hide another's loss.
            metrics.REQUESTS_UNACCOUNTED.labels(OTHER).set(
                sum(max(s.unaccounted or 0, 0) for s in rest)
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
