"""Coupons: the model, its Redis snapshot, and creation (MySQL row plus Redis state).

MySQL is the system of record. Redis holds, per coupon, the snapshot the Lua script judges by
(``{coupon:ID}:meta``) so the hot path never queries MySQL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomysql
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared import keys, redis_state
from shared.errors import (
    Conflict,
    CouponNotFound,
    InvalidRequest,
    OutsideWindow,
    RedisStateLost,
    SoldOut,
    Unavailable,
)
from shared.scripts import Scripts, UpdateStatus

log = structlog.get_logger(__name__)

COUPON_TYPE = "FIRST_COME_FIRST_SERVED"
MAX_ID = 2**63 - 1
MAX_INT32 = 2**31 - 1
# Window bounds a coupon may use: the Redis snapshot keeps epoch milliseconds and MySQL's
# DATETIME ends with year 9999.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _check_window(start: datetime, end: datetime) -> None:
    """The window must hold at least one millisecond as Redis sees it (the reservation script
    compares whole milliseconds): a shorter one would be accepted and never issue anything."""
    if to_ms(start) >= to_ms(end):
        raise InvalidRequest(
            "date_issue_start must be before date_issue_end, by at least a millisecond"
        )


def utc_naive(moment: datetime) -> datetime:
    """The form MySQL stores: UTC without tzinfo."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Coupon:
    """A coupon as the gateway and the worker see it."""

    id: int
    title: str
    total_quantity: int | None
    discount_amount: int
    min_available_amount: int
    date_issue_start: datetime
    date_issue_end: datetime
    paused: bool = False
    coupon_type: str = COUPON_TYPE

    @property
    def start_ms(self) -> int:
        return to_ms(self.date_issue_start)

    @property
    def end_ms(self) -> int:
        return to_ms(self.date_issue_end)

    def has_stock(self, issued: int) -> bool:
        """Room for one more issue after ``issued`` (always, when unlimited)."""
        return self.total_quantity is None or self.total_quantity > issued

    def in_window(self, now: datetime) -> bool:
        """Issuable at ``now``: start inclusive, end exclusive (the seed excluded both)."""
        return self.date_issue_start <= now < self.date_issue_end

    def is_issue_complete(self, now: datetime, issued: int) -> bool:
        """Nothing more can be issued: the window has ended or the stock is gone."""
        return now >= self.date_issue_end or not self.has_stock(issued)

    def check_issuable(self, now: datetime, issued: int) -> None:
        """Raise why one more issue is impossible: stock first, then the window (seed order)."""
        if not self.has_stock(issued):
            raise SoldOut(f"coupon {self.id} is sold out ({issued} of {self.total_quantity})")
        if not self.in_window(now):
            raise OutsideWindow(f"coupon {self.id} cannot be issued at {iso(now)}")

    def to_meta(self) -> dict[str, str | int]:
        """The ``{coupon:ID}:meta`` hash."""
        return {
            "id": self.id,
            "title": self.title,
            "coupon_type": self.coupon_type,
            "total": -1 if self.total_quantity is None else self.total_quantity,
            "discount_amount": self.discount_amount,
            "min_available_amount": self.min_available_amount,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "paused": int(self.paused),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> Coupon:
        total = int(meta["total"])
        return cls(
            id=int(meta["id"]),
            title=meta["title"],
            coupon_type=meta.get("coupon_type", COUPON_TYPE),
            total_quantity=None if total < 0 else total,
            discount_amount=int(meta["discount_amount"]),
            min_available_amount=int(meta["min_available_amount"]),
            date_issue_start=from_ms(int(meta["start_ms"])),
            date_issue_end=from_ms(int(meta["end_ms"])),
            paused=meta.get("paused") == "1",
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Coupon:
        return cls(
            id=int(row["id"]),
            title=row["title"],
            coupon_type=row["coupon_type"],
            total_quantity=row["total_quantity"],
            discount_amount=row["discount_amount"],
            min_available_amount=row["min_available_amount"],
            date_issue_start=row["date_issue_start"].replace(tzinfo=UTC),
            date_issue_end=row["date_issue_end"].replace(tzinfo=UTC),
            paused=bool(row["paused"]),
        )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "coupon_type": self.coupon_type,
            "total_quantity": self.total_quantity,
            "discount_amount": self.discount_amount,
            "min_available_amount": self.min_available_amount,
            "date_issue_start": iso(self.date_issue_start),
            "date_issue_end": iso(self.date_issue_end),
            "paused": self.paused,
        }


def _int_field(body: dict[str, Any], name: str, *, low: int, high: int, default: int | None) -> int:
    value = body.get(name, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
    return int(value)


def _datetime_field(body: dict[str, Any], name: str) -> datetime:
    value = body.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be an ISO-8601 timestamp with an offset")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} is not an ISO-8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:
        raise InvalidRequest(f"{name} needs a UTC offset, e.g. 2026-11-25T13:00:00+09:00")
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:  # an offset that pushes year 1 or 9999 out of range
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise InvalidRequest(f"{name} must lie between {EARLIEST.year} and {LATEST.year}")
    return utc


def _title(body: dict[str, Any]) -> str:
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > 255:
        raise InvalidRequest("title must be a non-empty string of at most 255 characters")
    return title.strip()


@dataclass(frozen=True, slots=True)
class NewCoupon:
    """A validated request to create a coupon."""

    title: str
    total_quantity: int | None
    discount_amount: int
    min_available_amount: int
    date_issue_start: datetime
    date_issue_end: datetime

    @classmethod
    def from_json(cls, body: Any) -> NewCoupon:
        """Validate an admin request body; raises :class:`InvalidRequest` with the reason."""
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        title = _title(body)
        total: int | None = None
        if body.get("total_quantity") is not None:
            total = _int_field(body, "total_quantity", low=0, high=MAX_INT32, default=None)
        start = _datetime_field(body, "date_issue_start")
        end = _datetime_field(body, "date_issue_end")
        _check_window(start, end)
        return cls(
            title=title,
            total_quantity=total,
            discount_amount=_int_field(body, "discount_amount", low=0, high=MAX_INT32, default=0),
            min_available_amount=_int_field(
                body, "min_available_amount", low=0, high=MAX_INT32, default=0
            ),
            date_issue_start=start,
            date_issue_end=end,
        )


@dataclass(frozen=True, slots=True)
class CouponChange:
    """A validated ``PATCH``: only the fields present change. ``total_quantity`` may be null
    (unlimited); ``paused`` pauses or resumes issuing."""

    changes: dict[str, Any]

    FIELDS = frozenset({"title", "total_quantity", "date_issue_start", "date_issue_end", "paused"})

    @classmethod
    def from_json(cls, body: Any) -> CouponChange:
        if not isinstance(body, dict) or not body:
            raise InvalidRequest(
                f"the body must be a JSON object with some of {sorted(cls.FIELDS)}"
            )
        unknown = set(body) - cls.FIELDS
        if unknown:
            raise InvalidRequest(
                f"cannot change {sorted(unknown)}; changeable: {sorted(cls.FIELDS)}"
            )
        changes: dict[str, Any] = {}
        if "title" in body:
            changes["title"] = _title(body)
        if "total_quantity" in body:
            changes["total_quantity"] = (
                None
                if body["total_quantity"] is None
                else _int_field(body, "total_quantity", low=0, high=MAX_INT32, default=None)
            )
        for name in ("date_issue_start", "date_issue_end"):
            if name in body:
                changes[name] = _datetime_field(body, name)
        if "paused" in body:
            if not isinstance(body["paused"], bool):
                raise InvalidRequest("paused must be true or false")
            changes["paused"] = body["paused"]
        return cls(changes)

    def apply(self, coupon: Coupon) -> Coupon:
        updated = dataclasses.replace(coupon, **self.changes)
        _check_window(updated.date_issue_start, updated.date_issue_end)
        return updated


async def ensure_group(redis: Redis, coupon_id: int) -> None:
    """Create the request stream and its consumer group, reading from the very beginning."""
    try:
        await redis.xgroup_create(
            keys.CouponKeys(coupon_id).requests, keys.GROUP, id="0", mkstream=True
        )
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def publish_state(redis: Redis, coupon: Coupon) -> None:
    """Write the coupon's Redis snapshot and tell every gateway and worker about it."""
    k = keys.CouponKeys(coupon.id)
    await ensure_group(redis, coupon.id)
    await redis.hset(k.meta, mapping=coupon.to_meta())  # type: ignore[arg-type]
    await redis.sadd(keys.ACTIVE_COUPONS, coupon.id)
    await redis.publish(keys.CHANGES_CHANNEL, coupon.id)


async def create_coupon(pool: aiomysql.Pool, redis: Redis, new: NewCoupon) -> Coupon:
    """Insert the MySQL row, then initialise the Redis state so the coupon is ready to issue.

    If Redis cannot be written the row is deleted again, so a coupon exists either in both
    stores or in neither. Refused while Redis has lost its state: creating would mark the
    empty Redis as complete and hide the loss of every other coupon.
    """
    if not await redis_state.state_present(redis, pool):
        raise RedisStateLost("Redis lost the coupon state; rebuild it before creating coupons")
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO coupons (title, coupon_type, total_quantity, discount_amount,"
            " min_available_amount, date_issue_start, date_issue_end)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                new.title,
                COUPON_TYPE,
                new.total_quantity,
                new.discount_amount,
                new.min_available_amount,
                utc_naive(new.date_issue_start),
                utc_naive(new.date_issue_end),
            ),
        )
        coupon_id = int(cur.lastrowid)
        await conn.commit()
    coupon = Coupon(id=coupon_id, **dataclasses.asdict(new))
    try:
        await publish_state(redis, coupon)
    except RedisError as exc:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("DELETE FROM coupons WHERE id = %s", (coupon_id,))
            await conn.commit()
        log.error("coupon_create_rolled_back", coupon_id=coupon_id, error=str(exc))
        raise Unavailable("Redis is unreachable; the coupon was not created") from exc
    log.info("coupon_created", coupon_id=coupon_id, total_quantity=new.total_quantity)
    return coupon


async def update_coupon(
    pool: aiomysql.Pool, redis: Redis, coupon_id: int, change: CouponChange
) -> Coupon:
    """Apply an admin change to both stores; every gateway sees it within a pub/sub round trip.

    The coupon row stays locked (``FOR UPDATE``) while Redis is rewritten, so changes apply one
    at a time and workers wait for the outcome. The stock check runs inside Redis, atomically
    with the reservations it guards: a total below the slots already promised is refused (409),
    never applied. Redis changes first; should MySQL then fail, the caller gets a 503 and
    repeating the same PATCH makes the two stores agree again.
    """
    async with pool.acquire() as conn:
        try:
            await conn.begin()
            async with conn.cursor(aiomysql.DictCursor) as cur:
                await cur.execute("SELECT * FROM coupons WHERE id = %s FOR UPDATE", (coupon_id,))
                row = await cur.fetchone()
                if row is None:
                    raise CouponNotFound(f"coupon {coupon_id} does not exist")
                updated = change.apply(Coupon.from_row(row))
                total = updated.total_quantity
                if total is not None and total < row["issued_quantity"]:
                    raise Conflict(
                        f"total_quantity {total} is below the {row['issued_quantity']} issued"
                    )
                await cur.execute(
                    "UPDATE coupons SET title = %s, total_quantity = %s, date_issue_start = %s,"
                    " date_issue_end = %s, paused = %s WHERE id = %s",
                    (
                        updated.title,
                        total,
                        utc_naive(updated.date_issue_start),
                        utc_naive(updated.date_issue_end),
                        int(updated.paused),
                        coupon_id,
                    ),
                )
                try:
                    status, reserved = await Scripts(redis).update(
                        coupon_id, total, updated.to_meta()
                    )
                except RedisError as exc:
                    raise Unavailable("Redis is unreachable; repeat the change") from exc
                if status is UpdateStatus.STATE_MISSING:
                    raise Unavailable(
                        f"coupon {coupon_id} has no Redis state; rebuild it before changing it"
                    )
                if status is UpdateStatus.BELOW_RESERVED:
                    raise Conflict(
                        f"total_quantity {total} is below the {reserved} requests already accepted"
                    )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    log.info("coupon_updated", coupon_id=coupon_id, changes=sorted(change.changes))
    return updated


async def list_coupons(
    pool: aiomysql.Pool, *, after_id: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    """Coupons by id, a page at a time, each with its MySQL ``issued_quantity``."""
    async with pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
        await cur.execute(
            "SELECT * FROM coupons WHERE id > %s ORDER BY id LIMIT %s", (after_id, limit)
        )
        rows = await cur.fetchall()
        await conn.rollback()
    return [
        {**Coupon.from_row(row).public(), "issued_quantity": int(row["issued_quantity"])}
        for row in rows
    ]


async def load_snapshot(redis: Redis, coupon_id: int) -> Coupon | None:
    """The coupon as Redis knows it, or None when there is no such coupon.

    Raises :class:`RedisStateLost` when the coupon is missing because Redis lost its data
    (the state marker is gone too): "not found" would be a lie, and re-creating state would
    sell the stock a second time.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.CouponKeys(coupon_id).meta)
        pipe.exists(keys.STATE_MARKER)
        meta, marked = await pipe.execute()
    if not meta:
        if not marked:
            raise RedisStateLost("Redis lost the coupon state; an operator must rebuild it")
        return None
    return Coupon.from_meta({_s(k): _s(v) for k, v in meta.items()})


async def fetch_coupon(pool: aiomysql.Pool, coupon_id: int) -> Coupon | None:
    async with pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
        await cur.execute("SELECT * FROM coupons WHERE id = %s", (coupon_id,))
        row = await cur.fetchone()
        await conn.rollback()
    return None if row is None else Coupon.from_row(row)


@dataclass(frozen=True, slots=True)
class Counters:
    """Where every accepted request of one coupon stands: each is exactly one of issued,
    pending or dead-lettered."""

    requested: int
    issued: int
    issued_quantity: int
    pending: int
    dead_lettered: int
    remaining: int | None
    reserved: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def counters(pool: aiomysql.Pool, redis: Redis, coupon: Coupon) -> Counters:
    """Read the counters from both stores; between a commit and its ack an entry shows twice."""
    k = keys.CouponKeys(coupon.id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xinfo_stream(k.requests)
        pipe.xinfo_groups(k.requests)
        pipe.xlen(k.dead)
        pipe.scard(k.users)
        stream, groups, dead, reserved = await pipe.execute(raise_on_error=False)
    if isinstance(stream, ResponseError):
        requested, pending = 0, 0
    else:
        requested = int(stream["entries-added"])
        group = next((g for g in groups if _s(g["name"]) == keys.GROUP), None)
        pending = 0 if group is None else int(group["pending"]) + int(group.get("lag") or 0)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT c.issued_quantity, (SELECT COUNT(*) FROM coupon_issues i"
            " WHERE i.coupon_id = c.id) FROM coupons c WHERE c.id = %s",
            (coupon.id,),
        )
        row = await cur.fetchone()
        await conn.rollback()
    issued_quantity, issued = (0, 0) if row is None else (int(row[0]), int(row[1]))
    total = coupon.total_quantity
    return Counters(
        requested=requested,
        issued=issued,
        issued_quantity=issued_quantity,
        pending=pending,
        dead_lettered=int(dead),
        remaining=None if total is None else max(total - int(reserved), 0),
        reserved=int(reserved),
    )


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
