"""``couponctl preflight ID``: is everything a drop needs in place, before it starts?

One function, :func:`preflight`, reads both stores (it writes nothing) and returns a
:class:`Report`: one :class:`Check` per condition, each ``ok``, ``warn`` or ``fail``. The drop
can start when no check failed; warnings are for the operator to judge.

1. ``redis_durability``: AOF on (with its fsync policy) and ``maxmemory-policy noeviction``,
   read from INFO (managed Redis services often disable CONFIG; the fsync policy is read with
   CONFIG GET where it is allowed). The rules of :func:`shared.redis.state.check_guarantees`,
   which the gateway and the workers apply at start, judged on every node, except that AOF off
   fails here: before a drop is the time to turn it on.
2. ``redis_memory``: the headroom under ``maxmemory`` against what the stock still to accept
   will take (:data:`ACCEPTED_REQUEST_BYTES` each, times :data:`MEMORY_SAFETY_FACTOR`). Under
   ``noeviction`` a full Redis refuses every reservation.
3. ``workers``: stream workers whose heartbeat (``coupons:workers``) is fresh on Redis time.
4. ``mysql`` and ``redis_state``: the coupon read from MySQL, and its Redis state (snapshot,
   active set, consumer group) present and agreeing with it.
5. ``window``: in UTC and in this machine's time zone; open already warns, ended fails.
6. ``coupon``: paused or sold out fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomysql
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.errors import CouponNotFound, RedisStateLost
from shared.model import Coupon
from shared.mysql import coupon_rows
from shared.ops import coupons
from shared.redis import client as redis_client
from shared.redis.coupon_state import load_snapshot
from shared.redis.scripts import HEARTBEAT_FRESH_SECONDS
from shared.redis.streams import redis_now_ms

OK, WARN, FAIL = "ok", "warn", "fail"

ACCEPTED_REQUEST_BYTES = 256
"""Redis memory one accepted request keeps until the coupon is deleted: its member of
``:users``, its stream entry (with its pending entry until acknowledged) and, once written,
its member of ``:issued``. Measured by ``tests/test_preflight.py``
(``test_accepted_request_memory_cost_is_covered``) on redis-server 7.0.15 (jemalloc): requests
accepted through ``issue.lua`` and written by a worker, ``used_memory`` read before and after.
16,385 requests with 19-digit user ids (the longest; the sets' hashtables just doubled) cost
about 210 bytes each; 10,000 with 12-digit ids, 169; 100,000 with 6-digit ids, 133. Rounded up to
256 for other versions and allocators; the test fails should the cost ever exceed it. (A
request of the synchronous route also keeps a member of ``:sync_issued``: one set member more,
which the safety factor covers.)"""

MEMORY_SAFETY_FACTOR = 2.0
"""The estimate is doubled: a set's hashtable doubles its bucket array while it grows, the
allocator fragments, and the drop's clients take output buffers."""

WORKER_FRESH_SECONDS = HEARTBEAT_FRESH_SECONDS
"""A worker counts as alive when its last heartbeat is younger than this (Redis time)."""

_SHOWN_WORKERS = 5


@dataclass(frozen=True, slots=True)
class Check:
    """One condition of the drop: ``status`` is ``ok``, ``warn`` or ``fail``."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True, slots=True)
class Report:
    """Every check of one coupon, in a fixed order."""

    coupon_id: int
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        """The drop can start: no check failed (warnings allowed)."""
        return not self.failed

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if check.status == FAIL]

    def as_dict(self) -> dict[str, Any]:
        return {
            "coupon_id": self.coupon_id,
            "ready": self.ready,
            "checks": [
                {"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks
            ],
        }


async def preflight(pool: aiomysql.Pool, redis: Redis, coupon_id: int) -> Report:
    """Check everything coupon ``coupon_id``'s drop needs; nothing is written.

    Raises :class:`~shared.errors.CouponNotFound` when MySQL has no such coupon, and the
    stores' own errors when one cannot be reached: those are no findings about the drop.
    """
    coupon = await coupon_rows.fetch_coupon(pool, coupon_id)
    if coupon is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    reserved = (await coupons.counters(pool, redis, coupon)).reserved
    now_ms = await redis_now_ms(redis)
    state, snapshot = await _redis_state(redis, coupon)
    # The gateway judges by the Redis snapshot; without one, MySQL says what it would be.
    judged = snapshot or coupon
    total = judged.total_quantity
    remaining = None if total is None else max(total - reserved, 0)
    memory = await redis_client.info_per_node(redis, "memory")
    checks = (
        await _durability(redis, memory),
        _memory(memory, remaining),
        await _workers(redis, now_ms),
        Check("mysql", OK, f"coupon {coupon_id} {coupon.title!r} read from MySQL"),
        state,
        _window(judged, now_ms),
        _coupon(judged, remaining),
    )
    return Report(coupon_id, checks)


async def _fsync_policy(redis: Redis) -> str | None:
    """``appendfsync``, or None where CONFIG is disabled or not allowed."""
    try:
        reply: Any = await redis.config_get("appendfsync")
    except ResponseError:
        return None
    if reply and all(isinstance(value, dict) for value in reply.values()):
        reply = next(iter(reply.values()))  # one answer per node
    policy = reply.get("appendfsync") if reply else None
    return None if policy is None else str(policy)


async def _durability(redis: Redis, memory: list[dict[str, Any]]) -> Check:
    persistence = await redis_client.info_per_node(redis, "persistence")
    failures: list[str] = []
    warnings: list[str] = []
    if any(str(node.get("aof_enabled", "0")) != "1" for node in persistence):
        failures.append("AOF is off: a Redis crash loses accepted requests (appendonly yes)")
    if any(str(node.get("aof_last_write_status", "ok")) != "ok" for node in persistence):
        failures.append("the last AOF write failed (aof_last_write_status): check the disk")
    policies = {str(node.get("maxmemory_policy", "")) for node in memory}
    evicting = sorted(policies - {"noeviction", ""})
    if evicting:
        failures.append(
            f"maxmemory-policy {', '.join(evicting)}: Redis may evict dedup sets and streams,"
            " reselling coupons and losing requests (maxmemory-policy noeviction)"
        )
    elif "" in policies:
        warnings.append("maxmemory-policy not reported by INFO: make sure it is noeviction")
    fsync = await _fsync_policy(redis)
    if fsync is None:
        aof = "AOF on (appendfsync not readable: CONFIG is not available)"
    elif fsync == "always":
        aof = "AOF on (appendfsync always)"
    elif fsync == "everysec":
        aof = "AOF on (appendfsync everysec: a power loss may lose about 1 s of 202s)"
    else:
        aof = f"AOF on (appendfsync {fsync})"
        warnings.append(f"appendfsync {fsync}: the OS decides when accepted requests reach disk")
    if failures:
        return Check("redis_durability", FAIL, "; ".join(failures + warnings))
    detail = f"{aof}, maxmemory-policy noeviction"
    if warnings:
        return Check("redis_durability", WARN, "; ".join([detail, *warnings]))
    return Check("redis_durability", OK, detail)


def _memory(nodes: list[dict[str, Any]], remaining: int | None) -> Check:
    used = max(int(node.get("used_memory", 0)) for node in nodes)
    limits = [int(node.get("maxmemory", 0)) for node in nodes]
    bounded = [
        int(node.get("maxmemory", 0)) - int(node.get("used_memory", 0))
        for node in nodes
        if int(node.get("maxmemory", 0))
    ]
    headroom = min(bounded) if bounded else None
    usage = f"used {_bytes(used)}" + (f" of {_bytes(max(limits))}" if headroom is not None else "")
    if headroom is not None and headroom <= 0:
        return Check("redis_memory", FAIL, f"Redis is full ({usage}): it refuses every write")
    if remaining is None:
        return Check(
            "redis_memory",
            WARN,
            f"{usage}; an unlimited coupon: what the drop needs cannot be estimated"
            f" ({_bytes(ACCEPTED_REQUEST_BYTES)} per accepted request)",
        )
    need = math.ceil(remaining * ACCEPTED_REQUEST_BYTES * MEMORY_SAFETY_FACTOR)
    formula = f"{remaining} requests x {ACCEPTED_REQUEST_BYTES} B x {MEMORY_SAFETY_FACTOR:g}"
    estimate = f"the drop needs about {_bytes(need)} ({formula})"
    if headroom is None or 0 in limits:
        return Check(
            "redis_memory",
            WARN,
            f"maxmemory 0 (unbounded: the host's memory decides); {usage}; {estimate}",
        )
    if headroom < need:
        return Check(
            "redis_memory",
            FAIL,
            f"{usage}, {_bytes(headroom)} free: below the {_bytes(need)} the drop needs"
            f" ({formula}); raise maxmemory or free memory",
        )
    return Check("redis_memory", OK, f"{usage}, {_bytes(headroom)} free; {estimate}")


async def _workers(redis: Redis, now_ms: int) -> Check:
    fresh_ms = int(WORKER_FRESH_SECONDS * 1000)
    alive: Any = await redis.zrevrangebyscore(
        keys.WORKERS, "+inf", now_ms - fresh_ms, withscores=True
    )
    window = f"{WORKER_FRESH_SECONDS:g} s"
    if alive:
        shown = ", ".join(f"{name} {_ago(now_ms, score)}" for name, score in alive[:_SHOWN_WORKERS])
        more = f" and {len(alive) - _SHOWN_WORKERS} more" if len(alive) > _SHOWN_WORKERS else ""
        return Check(
            "workers", OK, f"{len(alive)} alive (heartbeat within {window}): {shown}{more}"
        )
    last: Any = await redis.zrevrange(keys.WORKERS, 0, 0, withscores=True)
    if last:
        name, score = last[0]
        return Check(
            "workers",
            FAIL,
            f"0 alive: no worker heartbeat within {window}; the last was {name}"
            f" {_ago(now_ms, score)}: start the workers, or see why they stopped turning",
        )
    return Check(
        "workers",
        FAIL,
        f"0 alive: no worker heartbeat within {window}, none in the last hour:"
        " start the workers (coupon-worker)",
    )


async def _redis_state(redis: Redis, coupon: Coupon) -> tuple[Check, Coupon | None]:
    """The snapshot the gateways judge by, and whether the workers will read the stream."""
    coupon_id = coupon.id
    try:
        snapshot = await load_snapshot(redis, coupon_id)
    except RedisStateLost:
        return Check(
            "redis_state",
            FAIL,
            "Redis lost the coupon state (the coupons:state marker is gone): run couponctl"
            " rebuild --all",
        ), None
    if snapshot is None:
        return Check(
            "redis_state",
            FAIL,
            f"coupon {coupon_id} has no Redis snapshot: run couponctl rebuild {coupon_id}",
        ), None
    stored = coupon.public()
    differing = [field for field, value in snapshot.public().items() if stored[field] != value]
    if differing:
        return Check(
            "redis_state",
            FAIL,
            f"the Redis snapshot differs from MySQL in {', '.join(differing)}: a change reached"
            f" one store only; repeat it (couponctl coupon update) or run couponctl rebuild"
            f" {coupon_id}",
        ), snapshot
    k = keys.CouponKeys(coupon_id)
    active = await redis.sismember(keys.ACTIVE_COUPONS, str(coupon_id))
    try:
        groups: list[dict[str, Any]] = await redis.xinfo_groups(k.requests)
    except ResponseError:  # no stream
        groups = []
    if not active or not any(group.get("name") == keys.GROUP for group in groups):
        return Check(
            "redis_state",
            FAIL,
            f"the workers would not read its stream (not in {keys.ACTIVE_COUPONS}, or no group"
            f" {keys.GROUP}): run couponctl rebuild {coupon_id}",
        ), snapshot
    return Check(
        "redis_state", OK, "snapshot present and equal to MySQL; stream read by the workers"
    ), snapshot


def _window(coupon: Coupon, now_ms: int) -> Check:
    """Judged on Redis time, as the reservation script judges it: start inclusive, end
    exclusive."""
    start, end = coupon.date_issue_start, coupon.date_issue_end
    shown = f"{_utc(start)} -> {_utc(end)}; local {_local(start)} -> {_local(end)}"
    if now_ms < coupon.start_ms:
        return Check("window", OK, f"starts in {_span(coupon.start_ms - now_ms)}: {shown}")
    if now_ms < coupon.end_ms:
        return Check(
            "window",
            WARN,
            f"open now (for {_span(now_ms - coupon.start_ms)}, ends in"
            f" {_span(coupon.end_ms - now_ms)}): the drop has already started; {shown}",
        )
    return Check("window", FAIL, f"ended {_span(now_ms - coupon.end_ms)} ago: {shown}")


def _coupon(coupon: Coupon, remaining: int | None) -> Check:
    if coupon.paused:
        return Check("coupon", FAIL, "paused: resume it before the start (couponctl coupon resume)")
    if remaining is None:
        return Check("coupon", OK, "not paused; unlimited stock")
    if remaining == 0:
        return Check(
            "coupon",
            FAIL,
            f"sold out: 0 of {coupon.total_quantity} left (top it up: couponctl coupon update"
            " --total N)",
        )
    return Check("coupon", OK, f"not paused; {remaining} of {coupon.total_quantity} left")


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _local(moment: datetime) -> str:
    """In this machine's time zone (``TZ``, else the system's)."""
    local = moment.astimezone()
    return f"{local:%Y-%m-%d %H:%M:%S} {local.tzname() or local.strftime('%z')}"


def _span(ms: int | float) -> str:
    """A duration for people: ``40 s``, ``12 min``, ``2 h 5 min``, ``3 d 4 h``."""
    seconds = max(int(ms // 1000), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 24:
        return f"{hours} h {minutes % 60} min"
    return f"{hours // 24} d {hours % 24} h"


def _ago(now_ms: int, score: float) -> str:
    age = max(now_ms - score, 0) / 1000
    return f"{age:.1f} s ago" if age < 60 else f"{_span(age * 1000)} ago"


def _bytes(count: int) -> str:
    if abs(count) < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
