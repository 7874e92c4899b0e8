"""What a worker reads from the request streams: new entries, its own pending entries after a
restart, and idle entries of other consumers to take over.

The worker (:mod:`stream_worker.worker`) decides what to do with them; this module only knows
how Redis hands them out: one ``XREADGROUP`` over every stream on a single Redis, one stream at a
time on a Cluster (a read may not span hash slots), ``XAUTOCLAIM`` for the idle ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.redis import client as redis_client
from shared.redis.coupon_state import active_coupon_ids, ensure_group
from shared.settings import Settings

log = structlog.get_logger(__name__)

Delivered = tuple[int, str, dict[str, str]]
"""(coupon id, entry id, fields) as read from a stream."""

# On a Redis Cluster reads cannot block across streams; an idle worker polls this often.
CLUSTER_IDLE_POLL_SECONDS = 0.05
# At most this many XAUTOCLAIM pages per stream per reclaim pass, so one pass is bounded.
RECLAIM_PAGES = 100


class StreamReader:
    """Reads the ``issuers`` group's entries of every active coupon for one consumer."""

    def __init__(self, redis: Redis, settings: Settings, stopping: asyncio.Event) -> None:
        self._redis = redis
        self._settings = settings
        self._stopping = stopping
        self.name = settings.worker_name
        self._streams: dict[str, int] = {}
        self._cluster = redis_client.is_cluster(redis)
        self._rotation = 0
        self.next_discovery = 0.0

    async def discover(self) -> None:
        """Pick up coupons created since the last look, and let go of those no longer active
        (retired), without a restart."""
        self.next_discovery = time.monotonic() + self._settings.discovery_interval_seconds
        try:
            active = {
                keys.CouponKeys(coupon_id).requests: coupon_id
                for coupon_id in await active_coupon_ids(self._redis)
            }
            for stream in set(self._streams) - set(active):
                log.info("stream_retired", coupon_id=self._streams.pop(stream))
            for stream, coupon_id in active.items():
                if stream not in self._streams:
                    await ensure_group(self._redis, coupon_id)
                    self._streams[stream] = coupon_id
                    log.info("stream_discovered", coupon_id=coupon_id)
        except (RedisError, OSError) as exc:
            log.warning("discovery_failed", error=repr(exc))

    async def read(self, *, block: bool) -> list[Delivered]:
        """New entries of every stream, up to a batch from each; on failure none (logged)."""
        if not self._streams:
            if block:
                await self._pause(self._settings.block_ms / 1000)
            return []
        try:
            if self._cluster:
                delivered = await self._read_each_stream()
                if not delivered and block:
                    await self._pause(CLUSTER_IDLE_POLL_SECONDS)
                return delivered
            reply = await self._redis.xreadgroup(
                keys.GROUP,
                self.name,
                dict.fromkeys(self._streams, ">"),
                count=self._settings.batch_size,
                block=self._settings.block_ms if block else None,
            )
        except (RedisError, OSError) as exc:
            if "NOGROUP" in str(exc):  # a stream retired since the last look: look again
                self.next_discovery = 0.0
            log.warning("read_failed", error=repr(exc))
            await self._pause(1.0)
            return []
        return _flatten(reply)

    async def _read_each_stream(self) -> list[Delivered]:
        """On a Redis Cluster each coupon's stream lives in its own hash slot and one
        XREADGROUP may not span slots: read them one by one (without blocking), starting at a
        different stream each time so none is starved, until a batch is full."""
        streams = list(self._streams)
        self._rotation = (self._rotation + 1) % len(streams)
        delivered: list[Delivered] = []
        for stream in streams[self._rotation :] + streams[: self._rotation]:
            room = self._settings.batch_size - len(delivered)
            if room <= 0:
                break
            reply = await self._redis.xreadgroup(keys.GROUP, self.name, {stream: ">"}, count=room)
            delivered.extend(_flatten(reply))
        return delivered

    async def own_pending(self) -> AsyncIterator[list[Delivered]]:
        """What this consumer name had in hand before a restart, a batch at a time; the next
        batch is read once the caller has settled the one before."""
        for stream, coupon_id in list(self._streams.items()):
            last = "0"
            while not self._stopping.is_set():
                try:
                    reply = await self._redis.xreadgroup(
                        keys.GROUP, self.name, {stream: last}, count=self._settings.batch_size
                    )
                except (RedisError, OSError) as exc:
                    log.warning("pending_read_failed", coupon_id=coupon_id, error=repr(exc))
                    break
                delivered = _flatten(reply)
                if not delivered:
                    break
                log.info("own_pending_recovered", coupon_id=coupon_id, entries=len(delivered))
                yield delivered
                last = delivered[-1][1]

    async def idle(self) -> AsyncIterator[tuple[list[Delivered], dict[str, int]]]:
        """Entries idle longer than ``reclaim_idle_ms``, claimed for this consumer a page at
        a time, with how often each has been delivered."""
        for stream, coupon_id in list(self._streams.items()):
            start = "0-0"
            for _ in range(RECLAIM_PAGES):
                try:
                    start, claimed, _deleted = await self._redis.xautoclaim(
                        stream,
                        keys.GROUP,
                        self.name,
                        self._settings.reclaim_idle_ms,
                        start,
                        count=self._settings.batch_size,
                    )
                    if not claimed:
                        break
                    deliveries = await self._delivery_counts(stream, claimed)
                except (RedisError, OSError) as exc:
                    log.warning("reclaim_failed", coupon_id=coupon_id, error=repr(exc))
                    break
                yield [(coupon_id, i, f) for i, f in claimed], deliveries
                if start == "0-0":
                    break

    async def keep_claimed(self, held: Sequence[tuple[int, str]]) -> None:
        """Re-claim (coupon id, entry id) pairs so that no other worker takes them over
        (JUSTID: this does not count as a delivery)."""
        by_stream: dict[str, list[int | bytes | str | memoryview[int]]] = {}
        for coupon_id, entry_id in held:
            by_stream.setdefault(keys.CouponKeys(coupon_id).requests, []).append(entry_id)
        try:
            for stream, ids in by_stream.items():
                await self._redis.xclaim(stream, keys.GROUP, self.name, 0, ids, justid=True)
        except (RedisError, OSError) as exc:
            log.warning("keep_claimed_failed", error=repr(exc))

    async def _delivery_counts(
        self, stream: str, claimed: Sequence[tuple[str, Any]]
    ) -> dict[str, int]:
        ids = [entry_id for entry_id, _ in claimed]
        rows = await self._redis.xpending_range(
            stream, keys.GROUP, min=ids[0], max=ids[-1], count=len(ids) * 2, consumername=self.name
        )
        return {str(row["message_id"]): int(row["times_delivered"]) for row in rows}

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass


def _flatten(reply: Any) -> list[Delivered]:
    """XREADGROUP's nested reply as a flat list, skipping entries deleted while pending."""
    delivered: list[Delivered] = []
    for stream, entries in reply or []:
        coupon_id = _coupon_of(stream)
        for entry_id, fields in entries:
            if fields is None:
                continue
            delivered.append((coupon_id, entry_id, fields))
    return delivered


def _coupon_of(stream: str) -> int:
    # "{coupon:42}:requests" -> 42
    return int(stream[len("{coupon:") : stream.index("}")])
