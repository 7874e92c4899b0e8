"""The MySQL side of issuing: one transaction per batch, idempotent under redelivery.

The stream worker commits batches with it, and the synchronous ``/v1/issue`` route commits a
batch of one, so both paths share one set of rules (the cap, the dedup, the dead letters).

Every decision about a request is taken under the ``SELECT … FOR UPDATE`` lock of its coupon
row, so a worker committing a batch and a worker dead-lettering the same request serialise:
whichever comes second sees the first one's row. That makes a late (zombie) worker harmless.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiomysql
import pymysql

from shared.coupons import MAX_ID

INSERT_ISSUES = (
    "INSERT INTO coupon_issues (coupon_id, user_id, request_id, date_issued)"
    " VALUES (%s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE id = id"
)
INSERT_DEAD_LETTERS = (
    "INSERT INTO coupon_issue_dead_letters (coupon_id, request_id, user_id, reason)"
    " VALUES (%s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE reason = reason"
)

# MySQL errors that say "try the same thing again later", not "this data is bad".
TRANSIENT_MYSQL_ERRORS = frozenset(
    {
        1040,  # too many connections
        1205,  # lock wait timeout
        1213,  # deadlock
        2003,  # cannot connect
        2006,  # server has gone away
        2013,  # lost connection during query
        2014,  # commands out of sync (a connection broken mid-query)
        1927,  # connection killed (MariaDB)
        1053,  # server shutdown in progress
        4031,  # disconnected by the server for inactivity (MariaDB)
    }
)


# The latest acceptance time a valid entry can carry (9999-12-31, the end of DATETIME).
MAX_ACCEPTED_MS = 253_402_300_799_999


class Malformed(ValueError):
    """A stream entry that can never become a row."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One accepted request read from ``{coupon:ID}:requests``."""

    coupon_id: int
    entry_id: str
    user_id: int
    accepted_ms: int

    @classmethod
    def parse(cls, coupon_id: int, entry_id: str, fields: dict[str, str]) -> Entry:
        """Validate the fields the Lua script wrote; raises :class:`Malformed`."""
        try:
            user_id = int(fields["u"])
            accepted_ms = int(fields["t"])
            field_coupon = int(fields["c"])
        except (KeyError, ValueError, TypeError):
            raise Malformed(f"entry {entry_id} lacks valid c/u/t fields") from None
        if (
            field_coupon != coupon_id
            or not 1 <= user_id <= MAX_ID
            or not 0 < accepted_ms <= MAX_ACCEPTED_MS
        ):
            raise Malformed(f"entry {entry_id} has out-of-range fields")
        return cls(coupon_id, entry_id, user_id, accepted_ms)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Stream order: entry ids are ``<ms>-<seq>``."""
        ms, _, seq = self.entry_id.partition("-")
        return int(ms), int(seq or 0)

    @property
    def accepted_at(self) -> datetime:
        """Acceptance time (Redis clock), stored as ``date_issued``, UTC without tzinfo."""
        return datetime.fromtimestamp(self.accepted_ms / 1000, tz=UTC).replace(tzinfo=None)


@dataclass(slots=True)
class BatchResult:
    """How a batch was settled. Every entry lands in exactly one list."""

    inserted: list[Entry] = field(default_factory=list)
    """Got a new row in this transaction."""
    already_issued: list[Entry] = field(default_factory=list)
    """The user already had a row (a redelivery, or the synchronous path): done."""
    to_dead_letter: list[Entry] = field(default_factory=list)
    """Dead-lettered in MySQL (now or earlier); Redis must release the slot and ack."""
    unknown_coupon: list[Entry] = field(default_factory=list)
    """No such coupon in MySQL: left pending, dead-lettered after the delivery limit."""

    @property
    def issued(self) -> list[Entry]:
        return self.inserted + self.already_issued


def is_transient(exc: BaseException) -> bool:
    """"Try the same batch again later" (the server or the network), as opposed to "this data
    is bad", which must not be retried forever: it goes to the delivery limit instead."""
    if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InterfaceError):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        # 2000-2999 are the client library's connection errors; 4000+ are server errors
        # (4025 is a failed CHECK constraint) and only the listed ones are transient.
        return code is None or code in TRANSIENT_MYSQL_ERRORS or 2000 <= code < 3000
    return isinstance(exc, ConnectionError | TimeoutError | socket.gaierror)


def _by_coupon(entries: Iterable[Entry]) -> list[tuple[int, list[Entry]]]:
    """Group entries by coupon in ascending id order (one lock order for every worker)."""
    ordered = sorted(entries, key=lambda e: (e.coupon_id, e.sort_key))
    return [
        (cid, list(group)) for cid, group in itertools.groupby(ordered, key=lambda e: e.coupon_id)
    ]


def _placeholders(n: int) -> str:
    return ", ".join(["%s"] * n)


async def _lock_coupons(cur: aiomysql.Cursor, coupon_ids: Sequence[int]) -> dict[int, int | None]:
    """Lock the coupon rows; returns coupon id -> room left (None = unlimited)."""
    await cur.execute(
        "SELECT id, total_quantity, issued_quantity FROM coupons"
        f" WHERE id IN ({_placeholders(len(coupon_ids))}) ORDER BY id FOR UPDATE",
        tuple(coupon_ids),
    )
    return {
        int(cid): None if total is None else max(int(total) - int(issued), 0)
        for cid, total, issued in await cur.fetchall()
    }


async def _issued_users(cur: aiomysql.Cursor, coupon_id: int, users: Sequence[int]) -> set[int]:
    await cur.execute(
        "SELECT user_id FROM coupon_issues"
        f" WHERE coupon_id = %s AND user_id IN ({_placeholders(len(users))})",
        (coupon_id, *users),
    )
    return {int(row[0]) for row in await cur.fetchall()}


async def _dead_requests(
    cur: aiomysql.Cursor, coupon_id: int, request_ids: Sequence[str]
) -> set[str]:
    await cur.execute(
        "SELECT request_id FROM coupon_issue_dead_letters"
        f" WHERE coupon_id = %s AND request_id IN ({_placeholders(len(request_ids))})",
        (coupon_id, *request_ids),
    )
    return {str(row[0]) for row in await cur.fetchall()}


async def write_batch(pool: aiomysql.Pool, entries: Sequence[Entry]) -> BatchResult:
    """Issue a batch in one transaction: new rows, ``issued_quantity`` raised, never past the cap.

    Entries beyond the cap (Redis state was wrong) are dead-lettered in the same transaction.
    """
    result = BatchResult()
    if not entries:
        return result
    groups = _by_coupon(entries)
    async with pool.acquire() as conn:
        try:
            await conn.begin()
            async with conn.cursor() as cur:
                room_by_coupon = await _lock_coupons(cur, [cid for cid, _ in groups])
                for coupon_id, group in groups:
                    if coupon_id not in room_by_coupon:
                        result.unknown_coupon.extend(group)
                        continue
                    await _settle_coupon(cur, coupon_id, group, room_by_coupon[coupon_id], result)
            await conn.commit()
        except BaseException:
            await _rollback_quietly(conn)
            raise
    return result


async def _settle_coupon(
    cur: aiomysql.Cursor,
    coupon_id: int,
    group: list[Entry],
    room: int | None,
    result: BatchResult,
) -> None:
    dead = await _dead_requests(cur, coupon_id, [e.entry_id for e in group])
    alive = [e for e in group if e.entry_id not in dead]
    result.to_dead_letter.extend(e for e in group if e.entry_id in dead)
    if not alive:
        return
    issued = await _issued_users(cur, coupon_id, sorted({e.user_id for e in alive}))
    fresh: list[Entry] = []
    for entry in alive:
        if entry.user_id in issued:
            result.already_issued.append(entry)
        else:
            issued.add(entry.user_id)
            fresh.append(entry)
    take = fresh if room is None else fresh[:room]
    over_cap = fresh[len(take) :]
    if take:
        await cur.executemany(
            INSERT_ISSUES,
            [(e.coupon_id, e.user_id, e.entry_id, e.accepted_at) for e in take],
        )
        # Without CLIENT_FOUND_ROWS a no-op "ON DUPLICATE KEY UPDATE id = id" counts 0, so the
        # row count is exactly the rows this statement created: issued_quantity stays equal to
        # the number of rows even if a row appeared since the read above.
        await cur.execute(
            "UPDATE coupons SET issued_quantity = issued_quantity + %s WHERE id = %s",
            (cur.rowcount, coupon_id),
        )
        result.inserted.extend(take)
    if over_cap:
        await cur.executemany(
            INSERT_DEAD_LETTERS,
            [(e.coupon_id, e.entry_id, e.user_id, "over_cap") for e in over_cap],
        )
        result.to_dead_letter.extend(over_cap)


async def dead_letter(pool: aiomysql.Pool, entries: Sequence[Entry], reason: str) -> BatchResult:
    """Record requests as dead in MySQL, unless their user already has a row.

    Returns which entries were in fact issued (ack them as issued) and which are now dead
    (release their slots in Redis).
    """
    result = BatchResult()
    if not entries:
        return result
    async with pool.acquire() as conn:
        try:
            await conn.begin()
            async with conn.cursor() as cur:
                groups = _by_coupon(entries)
                known = await _lock_coupons(cur, [cid for cid, _ in groups])
                for coupon_id, group in groups:
                    issued = set()
                    if coupon_id in known:
                        issued = await _issued_users(
                            cur, coupon_id, sorted({e.user_id for e in group})
                        )
                    result.already_issued.extend(e for e in group if e.user_id in issued)
                    dead = [e for e in group if e.user_id not in issued]
                    if dead:
                        await cur.executemany(
                            INSERT_DEAD_LETTERS,
                            [(e.coupon_id, e.entry_id, e.user_id, reason) for e in dead],
                        )
                        result.to_dead_letter.extend(dead)
            await conn.commit()
        except BaseException:
            await _rollback_quietly(conn)
            raise
    return result


async def _rollback_quietly(conn: aiomysql.Connection) -> None:
    try:
        await conn.rollback()
    except Exception:  # noqa: S110 - the connection is broken; the pool drops it
        pass
