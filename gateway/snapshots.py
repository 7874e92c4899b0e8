"""The in-process coupon snapshot cache, kept fresh by Redis pub/sub.

A snapshot is the coupon's ``{coupon:ID}:meta`` hash. Entries are dropped at once when a
``coupons:changed`` message names their coupon (creation, change, a released slot), and all of
them whenever the subscription drops (:mod:`gateway.changes`), so a change reaches every
gateway within a round trip. The TTL is only a safety net. Unknown ids are cached too
(negative caching), so a flood of bad ids costs one Redis read per id per TTL and never reaches
MySQL; the cache holds at most ``max_entries`` ids, so an enumeration of ids cannot fill the
process's memory. The sold-out flag lets the gateway answer without a Redis round trip; the
same messages clear it.
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from gateway import changes
from shared import metrics
from shared.model import Coupon
from shared.redis.coupon_state import load_snapshot

# Bound once: labels() costs more than the inc() itself, and a hit is on every request.
_HITS = metrics.SNAPSHOT_LOOKUPS.labels("hit")
_MISSES = metrics.SNAPSHOT_LOOKUPS.labels("miss")


class SnapshotCache:
    """Coupon snapshots and sold-out flags for one gateway process."""

    def __init__(self, redis: Redis, *, ttl: float, max_entries: int) -> None:
        self._redis = redis
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: dict[int, tuple[float, Coupon | None]] = {}
        self._sold_out: dict[int, float] = {}
        self._loading: dict[int, asyncio.Future[Coupon | None]] = {}
        # Bumped by every invalidation: a load that started before one must not cache what it
        # read, or a change published mid-load would be hidden for a whole TTL.
        self._generation = 0

    async def get(self, coupon_id: int) -> Coupon | None:
        """The coupon, or None when Redis has no such coupon. One load per id at a time."""
        entry = self._entries.get(coupon_id)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            _HITS.inc()
            return entry[1]
        _MISSES.inc()
        loading = self._loading.get(coupon_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Coupon | None] = asyncio.get_running_loop().create_future()
        self._loading[coupon_id] = future
        generation = self._generation
        try:
            coupon = await load_snapshot(self._redis, coupon_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._loading[coupon_id]
        if generation == self._generation:
            self._store(coupon_id, (now + self._ttl, coupon))
        future.set_result(coupon)
        return coupon

    def _store(self, coupon_id: int, entry: tuple[float, Coupon | None]) -> None:
        """Insert at the end; past the bound, drop the entry loaded longest ago. Every load
        re-inserts, so the dict's order is load order, and the oldest load is the first key:
        an LRU by load time without any bookkeeping on the hit path (a hand-written dict, not
        cachetools, whose per-lookup expiry and recency updates would cost every request)."""
        self._entries.pop(coupon_id, None)
        self._entries[coupon_id] = entry
        if len(self._entries) > self._max_entries:
            del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        """Ids held (found and unknown)."""
        return len(self._entries)

    def invalidate(self, coupon_id: int | None = None) -> None:
        """Forget one coupon (or all of them, when pub/sub messages may have been missed)."""
        self._generation += 1
        if coupon_id is None:
            self._entries.clear()
            self._sold_out.clear()
        else:
            self._entries.pop(coupon_id, None)
            self._sold_out.pop(coupon_id, None)

    def mark_sold_out(self, coupon_id: int) -> None:
        self._sold_out[coupon_id] = time.monotonic() + self._ttl

    def is_sold_out(self, coupon_id: int) -> bool:
        until = self._sold_out.get(coupon_id)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._sold_out[coupon_id]
            return False
        return True

    def news_handler(self) -> changes.Handler:
        """How the change listener keeps this cache fresh: a change forgets the coupon (a sold
        out needs nothing: the next reservation call says so itself)."""
        return changes.Handler(changed=self.invalidate, resync=self.invalidate)
