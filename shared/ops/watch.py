"""What the operator console shows: where a drop stands, read from both stores once a second.

A :class:`DropWatch` samples the newest live coupons (those in ``coupons:active``): the stock,
what Redis reserved, what MySQL issued, what waits for a worker, what was dead-lettered, the
moment a coupon sold out, and from one sample to the next the accept rate and how long issued
requests took from their acceptance to their MySQL row. It keeps the last minutes of those
rates, so a console that connects mid-drop sees the curve so far (as far as this watch sampled
it). Each store is read on its own: with MySQL down the Redis half still comes, with a warning,
and the other way round.

The reads are cheap whatever the drop's size: one Redis pipeline and one backlog read for all
shown coupons, ``issued_quantity`` by primary key, and a primary-key range of the rows written
since the last sample.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomysql
from pymysql.err import MySQLError
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from shared import keys
from shared.model import Coupon, iso
from shared.mysql import coupon_rows
from shared.redis.coupon_state import active_coupon_ids
from shared.redis.scripts import HEARTBEAT_FRESH_SECONDS
from shared.redis.streams import (
    NOTHING_WAITING,
    Backlog,
    backlogs,
    entries_added,
    redis_now_ms,
)

SHOWN_COUPONS = 10
"""Live coupons a sample shows, the newest (highest ids) first."""
HISTORY_POINTS = 180
"""Samples of rates kept per coupon: three minutes at one a second."""
MYSQL_SECONDS = 2.0
"""How long a sample waits for MySQL before it shows the Redis half with a warning."""

REDIS_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
MYSQL_ERRORS = (MySQLError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Point:
    """One coupon's rates between two samples."""

    at_ms: int
    accepted_per_second: float
    issued_per_second: float
    issue_mean_ms: float | None
    """Acceptance to MySQL row, mean over the rows written since the last sample (None: none)."""
    issue_max_ms: float | None

    def as_list(self) -> list[Any]:
        return [
            self.at_ms,
            round(self.accepted_per_second, 1),
            round(self.issued_per_second, 1),
            None if self.issue_mean_ms is None else round(self.issue_mean_ms, 1),
            None if self.issue_max_ms is None else round(self.issue_max_ms, 1),
        ]


@dataclass(frozen=True, slots=True)
class _Totals:
    at_ms: int
    requested: int
    issued: int | None


@dataclass(frozen=True, slots=True)
class _RedisView:
    """One coupon as Redis has it at one sample."""

    coupon: Coupon
    requested: int
    last_accepted_ms: int | None
    reserved: int
    dead_lettered: int
    backlog: Backlog


def _warning(code: str, detail: str, coupon_id: int | None = None) -> dict[str, Any]:
    return {"code": code, "detail": detail, "coupon_id": coupon_id}


class DropWatch:
    """Samples of the live coupons, with the rates between them; one per console audience."""

    def __init__(self, redis: Redis, pool: aiomysql.Pool, *, shown: int = SHOWN_COUPONS) -> None:
        self._redis = redis
        self._pool = pool
        self._shown = shown
        self._history: dict[int, deque[Point]] = {}
        self._last: dict[int, _Totals] = {}
        self._issued: dict[int, int] = {}
        """The last ``issued_quantity`` MySQL gave, shown while it does not answer."""
        self._row_mark: int | None = None

    def reset(self) -> None:
        """Forget the history and the marks (nobody watched for a while: a rate from the last
        sample then to the next would span the whole gap)."""
        self._history.clear()
        self._last.clear()
        self._row_mark = None

    async def sample(self) -> dict[str, Any]:
        """The state of the drop now: ``at``, ``workers``, ``coupons`` (each with its counters
        and ``history``), ``more`` (live coupons not shown) and ``warnings``."""
        warnings: list[dict[str, Any]] = []
        try:
            now_ms, marked, workers, ids, views = await self._read_redis()
        except REDIS_ERRORS:
            warning = _warning("redis_unreachable", "Redis does not answer: nothing is accepted")
            return {"at": None, "workers": None, "coupons": [], "more": 0, "warnings": [warning]}
        if not marked:
            warnings.append(_warning(
                "state_lost",
                "Redis lost the service's state: every issue request answers 503 until an"
                " operator runs couponctl rebuild --all",
            ))  # fmt: skip
        issued, timings, fresh = await self._read_mysql(
            [view.coupon.id for view in views], warnings
        )
        coupons = [self._coupon(view, now_ms, issued, timings, fresh=fresh) for view in views]
        waiting = sum(c["pending"] for c in coupons)
        if workers == 0 and (waiting or any(c["phase"] == "open" for c in coupons)):
            held = (
                f"{waiting} accepted requests wait to be written to MySQL"
                if waiting
                else "what is accepted now waits in Redis until one starts"
            )
            warnings.append(_warning(
                "no_workers",
                f"no worker is alive (no heartbeat within {HEARTBEAT_FRESH_SECONDS:g} s): {held}",
            ))  # fmt: skip
        for coupon in coupons:
            if coupon["dead_lettered"]:
                warnings.append(_warning(
                    "dead_lettered",
                    f"coupon {coupon['id']}: {coupon['dead_lettered']} requests dead-lettered;"
                    f" see couponctl dead-letters list {coupon['id']}",
                    coupon["id"],
                ))  # fmt: skip
        self._forget_all_but({view.coupon.id for view in views})
        return {
            "at": iso(datetime.fromtimestamp(now_ms / 1000, UTC)),
            "workers": workers,
            "coupons": coupons,
            "more": max(len(ids) - len(views), 0),
            "warnings": warnings,
        }

    async def _read_redis(self) -> tuple[int, bool, int, list[int], list[_RedisView]]:
        redis = self._redis
        ids = await active_coupon_ids(redis)
        shown = sorted(ids, reverse=True)[: self._shown]
        now_ms = await redis_now_ms(redis)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.STATE_MARKER)
            pipe.zcount(keys.WORKERS, now_ms - int(HEARTBEAT_FRESH_SECONDS * 1000), "+inf")
            for coupon_id in shown:
                k = keys.CouponKeys(coupon_id)
                pipe.hgetall(k.meta)
                pipe.xinfo_stream(k.requests)
                pipe.xlen(k.dead)
                pipe.scard(k.users)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        marked, workers, *per_coupon = replies
        for index, reply in enumerate(replies):
            # A stream that does not exist yet is the one error that means "nothing"; any other
            # (a Cluster node that timed out) fails the Redis half, with its warning.
            expected = index >= 2 and (index - 2) % 4 == 1 and isinstance(reply, ResponseError)
            if isinstance(reply, Exception) and not expected:
                raise reply
        waiting = await backlogs(redis, shown)
        views = []
        for index, coupon_id in enumerate(shown):
            meta, stream, dead, reserved = per_coupon[4 * index : 4 * index + 4]
            if not meta:
                continue  # retired (or never made live) since the active set was read
            coupon = Coupon.from_meta({_text(k): _text(v) for k, v in meta.items()})
            if coupon.retired:
                continue
            last_ms = None
            if not isinstance(stream, ResponseError):  # no stream: nothing accepted yet
                last_id = _text(stream.get("last-generated-id") or "0-0")
                last_ms = int(last_id.partition("-")[0]) or None
            views.append(_RedisView(
                coupon=coupon,
                requested=entries_added(stream),
                last_accepted_ms=last_ms,
                reserved=int(reserved),
                dead_lettered=int(dead),
                backlog=waiting.get(coupon_id, NOTHING_WAITING),
            ))  # fmt: skip
        return now_ms, bool(marked), int(workers), ids, views

    async def _read_mysql(
        self, coupon_ids: list[int], warnings: list[dict[str, Any]]
    ) -> tuple[dict[int, int], dict[int, coupon_rows.IssueTimings], bool]:
        """``issued_quantity`` per coupon (the last known while MySQL fails), the timings of the
        rows written since the last sample, and whether MySQL answered this time."""
        try:
            async with asyncio.timeout(MYSQL_SECONDS):
                self._issued.update(await coupon_rows.issued_quantities(self._pool, coupon_ids))
                if self._row_mark is None:  # the rows before the first sample are history
                    self._row_mark = await coupon_rows.newest_issue_row(self._pool)
                    return dict(self._issued), {}, True
                self._row_mark, timings = await coupon_rows.issue_timings_since(
                    self._pool, self._row_mark
                )
        except MYSQL_ERRORS:
            warnings.append(_warning(
                "mysql_down",
                "MySQL does not answer: requests are still accepted and wait in Redis; the"
                " issued counts are the last MySQL gave",
            ))  # fmt: skip
            return dict(self._issued), {}, False
        return dict(self._issued), timings, True

    def _coupon(
        self,
        view: _RedisView,
        now_ms: int,
        issued: dict[int, int],
        timings: dict[int, coupon_rows.IssueTimings],
        *,
        fresh: bool,
    ) -> dict[str, Any]:
        coupon = view.coupon
        issued_now = issued.get(coupon.id)
        # A stale count (MySQL down) is shown, but no rate is taken from it: the first sample
        # after the outage would otherwise put the whole outage's rows into one second.
        counted = issued_now if fresh else None
        self._remember(coupon.id, _Totals(now_ms, view.requested, counted), timings)
        total = coupon.total_quantity
        remaining = None if total is None else max(total - view.reserved, 0)
        sold_out_at = None
        if remaining == 0 and view.last_accepted_ms is not None:
            # No request is accepted after the last slot is taken: the last acceptance is the
            # moment it sold out (again, after released slots were sold).
            sold_out_at = iso(datetime.fromtimestamp(view.last_accepted_ms / 1000, UTC))
        backlog = view.backlog
        return {
            "id": coupon.id,
            "title": coupon.title,
            "phase": coupon.phase_at(now_ms),
            "paused": coupon.paused,
            "date_issue_start": iso(coupon.date_issue_start),
            "date_issue_end": iso(coupon.date_issue_end),
            "total": total,
            "requested": view.requested,
            "reserved": view.reserved,
            "remaining": remaining,
            "issued": issued_now,
            "pending": backlog.total,
            "dead_lettered": view.dead_lettered,
            "sold_out_at": sold_out_at,
            "backlog": {
                "unread": backlog.lag,
                "unacknowledged": backlog.pending,
                "oldest_age_seconds": round(backlog.oldest_age_seconds(now_ms), 3),
            },
            "history": [point.as_list() for point in self._history.get(coupon.id, ())],
        }

    def _remember(
        self, coupon_id: int, totals: _Totals, timings: dict[int, coupon_rows.IssueTimings]
    ) -> None:
        last = self._last.get(coupon_id)
        self._last[coupon_id] = totals
        if last is None or totals.at_ms <= last.at_ms:
            return
        seconds = (totals.at_ms - last.at_ms) / 1000
        issued = 0 if totals.issued is None or last.issued is None else totals.issued - last.issued
        timing = timings.get(coupon_id)
        point = Point(
            at_ms=totals.at_ms,
            accepted_per_second=max(totals.requested - last.requested, 0) / seconds,
            issued_per_second=max(issued, 0) / seconds,
            issue_mean_ms=None if timing is None else timing.mean_ms,
            issue_max_ms=None if timing is None else timing.max_ms,
        )
        self._history.setdefault(coupon_id, deque(maxlen=HISTORY_POINTS)).append(point)

    def _forget_all_but(self, live: set[int]) -> None:
        for table in (self._history, self._last, self._issued):
            for coupon_id in set(table) - live:
                del table[coupon_id]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
