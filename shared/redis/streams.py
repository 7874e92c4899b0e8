"""A coupon's request stream as the rest of the service reads it.

- :func:`backlogs`: how far the workers are behind, per coupon (load shedding, the stream
  gauges and the admin counters all read it here);
- :func:`balances`: where every accepted request stands (issued, pending, dead-lettered), per
  coupon, for the ``coupon_requests_unaccounted`` gauge;
- :func:`scan` and :func:`unsettled_ids`: whole streams in bounded pages, for the operator's
  tools (rebuild, reconcile, dead letters).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from shared import keys
from shared.ids import entry_ms, entry_order, id_or_none
from shared.redis.client import is_cluster

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


def entries_added(info: Any) -> int:
    """Requests ever accepted into a stream, from its ``XINFO STREAM`` reply (a pipeline's error
    reply for a stream that does not exist yet: none). ``entries-added`` counts every entry ever
    added (Redis 7); older servers know the length."""
    if isinstance(info, ResponseError):
        return 0
    return int(info.get("entries-added", info.get("length", 0)))


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
        # The group's lag is derived from its entries-read counter, which Redis can get wrong
        # (seen: a stream of 40 entries, every one delivered, entries-read 20 and lag 20, after
        # restarts). Nothing after the last delivered id means nothing is waiting, whatever the
        # counter says.
        if not listed:
            lag = 0
        elif group.get("lag") is not None:
            lag = int(group["lag"])
        else:
            lag = len(listed)
        found[coupon_id] = (lag, entry_ms(str(listed[0][0])) if listed else None)
    return found


_BALANCE_LUA = (resources.files("shared.redis") / "lua" / "balance.lua").read_text("utf-8")
_BALANCE_SHA = hashlib.sha1(_BALANCE_LUA.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Balance:
    """Where one coupon's accepted requests stand, all read at one moment (``balance.lua``)."""

    accepted: int
    """Entries ever added to the request stream (``XINFO STREAM`` entries-added)."""
    issued: int
    """Users marked issued (``SCARD {coupon:ID}:issued``; a user has at most one row)."""
    pending: int
    """Not yet delivered (the group's lag) plus delivered and not acknowledged."""
    dead_lettered: int
    """Entries of the dead-letter stream (``XLEN {coupon:ID}:dead``)."""
    correction: int
    """The coupon's correction counter (:attr:`shared.keys.CouponKeys.correction`)."""

    @property
    def unaccounted(self) -> int:
        """Accepted requests that are neither issued, pending nor dead-lettered: 0 when
        every one is accounted for; below 0 when something is counted twice."""
        return self.accepted - self.issued - self.pending - self.dead_lettered - self.correction


async def balances(redis: Redis, coupon_ids: list[int]) -> dict[int, Balance | None]:
    """The :class:`Balance` of every coupon named, one script call per coupon (its keys share
    a hash slot, so each call runs on one shard), all in one pipelined round trip; a second
    one only after Redis lost its script cache. None where Redis cannot count the accepted
    or the undelivered entries (before Redis 7.0, or after entries were deleted).

    A cluster pipeline refuses EVALSHA (redis-py cannot know that every shard holds the
    script), so on a cluster the script's text goes with each call (EVAL)."""
    first = await _balance_calls(redis, coupon_ids, cached=not is_cluster(redis))
    replies = dict(zip(coupon_ids, first, strict=True))
    uncached = [cid for cid, reply in replies.items() if _noscript(reply)]
    if uncached:
        again = await _balance_calls(redis, uncached, cached=False)
        replies.update(zip(uncached, again, strict=True))
    found: dict[int, Balance | None] = {}
    for coupon_id, reply in replies.items():
        if isinstance(reply, Exception):
            raise reply
        accepted, lag, pending, issued, dead, correction = (int(value) for value in reply)
        known = accepted >= 0 and lag >= 0
        found[coupon_id] = (
            Balance(accepted, issued, lag + pending, dead, correction) if known else None
        )
    return found


async def _balance_calls(redis: Redis, coupon_ids: list[int], *, cached: bool) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for coupon_id in coupon_ids:
            k = keys.CouponKeys(coupon_id)
            names = (k.requests, k.issued, k.dead, k.correction)
            if cached:
                pipe.evalsha(_BALANCE_SHA, len(names), *names, keys.GROUP)
            else:  # EVAL also puts the script back into the cache
                pipe.eval(_BALANCE_LUA, len(names), *names, keys.GROUP)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies


def _noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
    )


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
