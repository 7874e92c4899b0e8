"""A coupon's request stream as the rest of the service reads it.

- :func:`backlogs`: how far the workers are behind, per coupon (load shedding, the stream
  gauges and the admin counters all read it here);
- :func:`scan` and :func:`unsettled_ids`: whole streams in bounded pages, for the operator's
  tools (rebuild, reconcile, dead letters).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.ids import entry_ms, entry_order, id_or_none

PAGE = 1000

# Without a "lag" field (Redis before 7, or after entries were deleted) the undelivered
# entries are counted by reading them, up to this many.
LAG_COUNT_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Backlog:
    """One coupon's accepted requests that are not settled yet."""

    lag: int
    """Accepted, not yet read by any worker."""
    pending: int
    """Read by a worker, not yet acknowledged (not yet committed to MySQL)."""
    oldest_ms: int | None
    """Redis milliseconds of the oldest of them (None when there are none)."""

    @property
    def total(self) -> int:
        return self.lag + self.pending

    def oldest_age_seconds(self, now_ms: int) -> float:
        return 0.0 if self.oldest_ms is None else max(now_ms - self.oldest_ms, 0) / 1000


NOTHING_WAITING = Backlog(lag=0, pending=0, oldest_ms=None)


async def redis_now_ms(redis: Redis) -> int:
    """The Redis server's clock, which stamps every entry id: ages measured on it are true
    whatever the local clock says."""
    clock: Any = await redis.time()
    if isinstance(clock, dict):  # a cluster client answers once per node
        clock = next(iter(clock.values()))
    seconds, micros = clock
    return int(seconds) * 1000 + int(micros) // 1000


async def backlogs(redis: Redis, coupon_ids: list[int]) -> dict[int, Backlog]:
    """The backlog of every coupon named, in two pipelined round trips however many there are.

    The first reads each group (``XINFO GROUPS``: its lag and last-delivered id) and its
    pending summary (``XPENDING``: the count and the oldest id); the second reads the first
    entry not yet delivered, where there is one. A coupon whose stream or group is missing has
    nothing waiting.
    """
    async with redis.pipeline(transaction=False) as pipe:
        for coupon_id in coupon_ids:
            stream = keys.CouponKeys(coupon_id).requests
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, keys.GROUP)
        # A missing stream is an error reply, which the pipeline hands back as a value.
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    groups: dict[int, dict[str, Any]] = {}
    pending: dict[int, tuple[int, int | None]] = {}
    for index, coupon_id in enumerate(coupon_ids):
        infos, summary = replies[2 * index : 2 * index + 2]
        group = next(
            (g for g in (infos if isinstance(infos, list) else []) if g.get("name") == keys.GROUP),
            None,
        )
        if group is None:
            continue
        groups[coupon_id] = group
        count = int(summary["pending"]) if isinstance(summary, dict) else 0
        oldest = summary.get("min") if count and isinstance(summary, dict) else None
        pending[coupon_id] = (count, entry_ms(str(oldest)) if oldest else None)
    undelivered = await _first_undelivered(redis, groups)
    found = {}
    for coupon_id in coupon_ids:
        if coupon_id not in groups:
            found[coupon_id] = NOTHING_WAITING
            continue
        count, oldest_pending = pending[coupon_id]
        lag, oldest_new = undelivered.get(coupon_id, (0, None))
        known = [ms for ms in (oldest_pending, oldest_new) if ms is not None]
        found[coupon_id] = Backlog(lag=lag, pending=count, oldest_ms=min(known, default=None))
    return found


async def _first_undelivered(
    redis: Redis, groups: dict[int, dict[str, Any]]
) -> dict[int, tuple[int, int | None]]:
    """coupon id -> (lag, Redis ms of the oldest entry not yet delivered, if any)."""
    waiting = {
        coupon_id: group
        for coupon_id, group in groups.items()
        if group.get("lag") is None or int(group["lag"]) > 0
    }
    if not waiting:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for coupon_id, group in waiting.items():
            stream = keys.CouponKeys(coupon_id).requests
            count = 1 if group.get("lag") is not None else LAG_COUNT_LIMIT
            pipe.xrange(stream, min=f"({group['last-delivered-id']}", max="+", count=count)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    found: dict[int, tuple[int, int | None]] = {}
    for (coupon_id, group), entries in zip(waiting.items(), replies, strict=True):
        listed = entries if isinstance(entries, list) else []
        lag = int(group["lag"]) if group.get("lag") is not None else len(listed)
        found[coupon_id] = (lag, entry_ms(str(listed[0][0])) if listed else None)
    return found


@dataclass(frozen=True, slots=True)
class StreamEntry:
    entry_id: str
    fields: dict[str, str]

    @property
    def user_id(self) -> int | None:
        """The ``u`` field as an id, or None when the entry is malformed."""
        return id_or_none(self.fields.get("u", ""))


async def scan(redis: Redis, stream: str, *, page: int = PAGE) -> AsyncIterator[list[StreamEntry]]:
    """Every entry of ``stream``, oldest first, ``page`` at a time."""
    start = "-"
    while True:
        # decode_responses=True: ids and fields are str (redis-py's stubs do not know that).
        raw: Any = await redis.xrange(stream, min=start, max="+", count=page)
        batch = [StreamEntry(entry_id, fields or {}) for entry_id, fields in raw]
        if not batch:
            return
        yield batch
        if len(batch) < page:
            return
        start = "(" + batch[-1].entry_id


async def unsettled_ids(redis: Redis, stream: str) -> set[str]:
    """Entries the ``issuers`` group has not settled: pending (delivered, not acknowledged) or
    not yet delivered at all (after the group's last-delivered id)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return set()
    group = next((g for g in groups if g["name"] == keys.GROUP), None)
    if group is None:  # no group yet: nothing was ever delivered
        return {e.entry_id async for batch in scan(redis, stream) for e in batch}
    unsettled: set[str] = set()
    start = "-"
    while True:
        rows = await redis.xpending_range(stream, keys.GROUP, min=start, max="+", count=PAGE)
        unsettled.update(str(row["message_id"]) for row in rows)
        if len(rows) < PAGE:
            break
        start = "(" + str(rows[-1]["message_id"])
    last = str(group["last-delivered-id"])
    async for batch in scan(redis, stream):
        unsettled.update(e.entry_id for e in batch if _after(e.entry_id, last))
    return unsettled


def _after(entry_id: str, other: str) -> bool:
    return entry_order(entry_id) > entry_order(other)
