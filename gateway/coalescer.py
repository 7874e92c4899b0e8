"""Request coalescing: concurrent requests for one coupon share one Lua call.

Requests that arrive in the same event-loop tick are sent together; while a call for a coupon is
in flight, new requests for it gather and go in the next call. One process therefore makes at
most one reservation call per coupon at a time, and the batch grows with the load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from redis.exceptions import RedisClusterException, RedisError

from shared import metrics
from shared.redis.scripts import BatchOutcome, IssueResult, Reservation, Scripts

log = structlog.get_logger(__name__)


# (user id, its future, when it was queued: time.monotonic())
_Waiter = tuple[int, "asyncio.Future[Reservation]", float]


class StateMissing(Exception):
    """Redis holds no state for the coupon."""


class NotReplicated(Exception):
    """Reserved on the primary, but its replicas did not confirm the call in time."""


@dataclass(slots=True)
class _Queue:
    waiting: list[_Waiter] = field(default_factory=list)
    scheduled: bool = False
    in_flight: bool = False
    in_flight_since: float = 0.0
    """When the oldest request of the call in flight was queued."""


class Coalescer:
    """Batches reservations per coupon into single ``issue.lua`` calls."""

    def __init__(self, scripts: Scripts, *, max_batch: int, timeout: float) -> None:
        self._scripts = scripts
        self._max_batch = max_batch
        self._timeout = timeout
        self._queues: dict[int, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.redis_clock_offset_ms: int | None = None
        """Redis server time minus local time, from the latest call (None before the first)."""
        self.on_outcome: list[Callable[[int, BatchOutcome], None]] = []

    async def reserve(self, coupon_id: int, user_id: int) -> Reservation:
        """Queue one user; raises :class:`StateMissing`, RedisError or TimeoutError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reservation] = loop.create_future()
        queue = self._queues.get(coupon_id)
        if queue is None:
            queue = self._queues[coupon_id] = _Queue()
        queue.waiting.append((user_id, future, time.monotonic()))
        if not queue.scheduled and not queue.in_flight:
            queue.scheduled = True
            loop.call_soon(self._flush, coupon_id)
        return await future

    def _flush(self, coupon_id: int) -> None:
        queue = self._queues[coupon_id]
        queue.scheduled = False
        if not queue.waiting:
            del self._queues[coupon_id]
            return
        batch = queue.waiting[: self._max_batch]
        del queue.waiting[: self._max_batch]
        queue.in_flight = True
        queue.in_flight_since = batch[0][2]
        task = asyncio.get_running_loop().create_task(self._call(coupon_id, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, coupon_id: int, batch: list[_Waiter]) -> None:
        started = time.perf_counter()
        try:
            outcome = await asyncio.wait_for(
                self._scripts.reserve(coupon_id, [user for user, _, _ in batch]), self._timeout
            )
        except (RedisError, RedisClusterException, TimeoutError, OSError) as exc:
            log.warning("reserve_failed", coupon_id=coupon_id, batch=len(batch), error=repr(exc))
            _settle(batch, error=exc)
        except Exception as exc:
            # Whatever else went wrong, no request of the batch may be left waiting forever.
            log.exception("reserve_crashed", coupon_id=coupon_id, batch=len(batch))
            _settle(batch, error=exc)
        else:
            metrics.RESERVE_SECONDS.observe(time.perf_counter() - started)
            metrics.RESERVE_BATCH_SIZE.observe(len(batch))
            self.redis_clock_offset_ms = outcome.redis_time_ms - int(time.time() * 1000)
            if outcome.replicated:  # an unconfirmed "sold out" may be undone by a failover
                for callback in self.on_outcome:
                    callback(coupon_id, outcome)
            if outcome.state_missing:
                _settle(batch, error=StateMissing(coupon_id))
            elif not outcome.replicated:
                _settle_unconfirmed(batch, outcome.reservations)
            else:
                _settle(batch, results=outcome.reservations)
                if outcome.remaining == 0:
                    self._answer_waiting_sold_out(coupon_id, outcome.redis_time_ms)
        finally:
            queue = self._queues[coupon_id]
            queue.in_flight = False
            if queue.waiting:
                self._flush(coupon_id)
            elif not queue.scheduled:
                del self._queues[coupon_id]

    def _answer_waiting_sold_out(self, coupon_id: int, decided_ms: int) -> None:
        """Redis just said the stock is gone: the requests queued behind that call get "sold
        out" now, as the fast path answers every later one, instead of each waiting its turn
        for a call that can only say the same. At the drop's sell-out moment thousands wait
        there; each further call would cost them a full round of the busy loop."""
        queue = self._queues[coupon_id]
        waiting, queue.waiting = queue.waiting, []
        sold_out = Reservation(IssueResult.SOLD_OUT, "", decided_ms)
        _settle(waiting, results=[sold_out] * len(waiting))

    def waiting(self, coupon_id: int) -> int:
        """Requests of the coupon queued for the next call (not the one in flight)."""
        queue = self._queues.get(coupon_id)
        return len(queue.waiting) if queue is not None else 0

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest request still waiting for its reservation has waited (0 when
        none waits): the signal of :class:`gateway.backpressure.WaitAdmission`."""
        oldest = now
        for queue in self._queues.values():
            if queue.in_flight:
                oldest = min(oldest, queue.in_flight_since)
            elif queue.waiting:
                oldest = min(oldest, queue.waiting[0][2])
        return now - oldest

    async def drain(self) -> None:
        """Wait for every in-flight call (graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _settle_unconfirmed(batch: list[_Waiter], reservations: list[Reservation]) -> None:
    """A call the replicas did not confirm: its acceptances are unknown, not 202s (a failover
    now could lose them). Its rejections stand: they promise nothing that a failover breaks."""
    for (_, future, _), reservation in zip(batch, reservations, strict=True):
        if future.done():
            continue
        if reservation.result is IssueResult.ACCEPTED:
            future.set_exception(NotReplicated(reservation.request_id))
        else:
            future.set_result(reservation)


def _settle(
    batch: list[_Waiter],
    *,
    results: list[Reservation] | None = None,
    error: BaseException | None = None,
) -> None:
    """Resolve every waiter of a batch (a waiter whose request was cancelled is skipped)."""
    for index, (_, future, _) in enumerate(batch):
        if future.done():
            continue
        if results is not None:
            future.set_result(results[index])
        else:
            future.set_exception(error or RuntimeError("batch settled without a result"))
