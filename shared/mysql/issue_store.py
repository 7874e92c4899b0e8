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
from datetime import datetime, timedelta

import aiomysql
import pymysql

from shared.ids import MAX_ID, entry_order
from shared.mysql.pool import transaction

# One row of the multi-row INSERT. The acceptance time travels as epoch milliseconds and MySQL
# turns it into the DATETIME: building and escaping 500 datetime objects in Python cost more
# than the rest of the statement (docs/PERFORMANCE.md). Pure DATETIME arithmetic, so neither
# the session time zone nor FROM_UNIXTIME's 2038 limit plays a part.
_ISSUE_ROW = "(%s, %s, %s, TIMESTAMPADD(MICROSECOND, %s * 1000, '1970-01-01'))"
# "id = id" is a no-op: a redelivered entry leaves the existing row as it is, and (without
# CLIENT_FOUND_ROWS) counts 0 in the row count, so the row count is the rows created.
_INSERT_ISSUES = (
    "INSERT INTO coupon_issues (coupon_id, user_id, request_id, date_issued) VALUES {rows}"
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


# Naive UTC, as every DATETIME here (exact integer arithmetic, no float seconds).
_EPOCH = datetime(1970, 1, 1)


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
        return entry_order(self.entry_id)

    @property
    def accepted_at(self) -> datetime:
        """Acceptance time (Redis clock), stored as ``date_issued``, UTC without tzinfo."""
        return _EPOCH + timedelta(milliseconds=self.accepted_ms)


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


class _NotAllNew(Exception):
    """The optimistic insert created fewer rows than it was given: undo and look first."""


async def write_batch(pool: aiomysql.Pool, entries: Sequence[Entry]) -> BatchResult:
    """Issue a batch in one transaction: new rows, ``issued_quantity`` raised, never past the cap.

    Entries beyond the cap (Redis state was wrong) are dead-lettered in the same transaction.

    The common batch is a drop in progress: entries Redis has already deduplicated, for a
    coupon with room for all of them and no dead letters. That batch is written optimistically:
    insert everything and check the row count (for one coupon: lock, dead-letter probe,
    INSERT, UPDATE, COMMIT). Any other coupon of the batch is written the careful way: look up
    the users and the dead letters first. When an optimistic insert creates fewer rows than it
    was given (a redelivery, a late worker), the transaction is rolled back and the whole batch
    is written the careful way in a new one, which takes the locks again. Both ways settle
    every entry the same; only the cost differs.
    """
    if not entries:
        return BatchResult()
    try:
        return await _write(pool, entries, optimistic=True)
    except _NotAllNew:
        return await _write(pool, entries, optimistic=False)


async def _write(pool: aiomysql.Pool, entries: Sequence[Entry], *, optimistic: bool) -> BatchResult:
    result = BatchResult()
    groups = _by_coupon(entries)
    async with transaction(pool) as cur:
        coupon_ids = [cid for cid, _ in groups]
        room_by_coupon = await _lock_coupons(cur, coupon_ids)
        # The coupons whose entries are looked up before they are written.
        look_first = (
            await _coupons_with_dead_letters(cur, coupon_ids) if optimistic else set(coupon_ids)
        )
        for coupon_id, group in groups:
            if coupon_id not in room_by_coupon:
                result.unknown_coupon.extend(group)
                continue
            room = room_by_coupon[coupon_id]
            if coupon_id not in look_first and _fits(group, room):
                await _insert_all(cur, coupon_id, group)
                result.inserted.extend(group)
            else:
                await _settle_coupon(cur, coupon_id, group, room, result)
    return result


def _fits(group: Sequence[Entry], room: int | None) -> bool:
    return room is None or room >= len(group)


async def _coupons_with_dead_letters(cur: aiomysql.Cursor, coupon_ids: Sequence[int]) -> set[int]:
    """The coupons that have any dead letter.

    This must be the transaction's first plain (non-locking) read, after ``_lock_coupons``:
    InnoDB takes the snapshot here, once every coupon lock is held, so it sees each dead
    letter that another worker committed under those locks before us. A plain read before
    the lock (or ``START TRANSACTION WITH CONSISTENT SNAPSHOT``) would break that.
    """
    await cur.execute(
        "SELECT DISTINCT coupon_id FROM coupon_issue_dead_letters"
        f" WHERE coupon_id IN ({_placeholders(len(coupon_ids))})",
        tuple(coupon_ids),
    )
    return {int(row[0]) for row in await cur.fetchall()}


async def _insert_all(cur: aiomysql.Cursor, coupon_id: int, group: Sequence[Entry]) -> None:
    """Insert every entry; any that already had a row aborts the optimistic attempt."""
    created = await _insert_issues(cur, group)
    if created != len(group):
        raise _NotAllNew
    await _count_issued(cur, coupon_id, created)


async def _insert_issues(cur: aiomysql.Cursor, entries: Sequence[Entry]) -> int:
    """One multi-row INSERT; returns the number of rows it created."""
    await cur.execute(
        _INSERT_ISSUES.format(rows=", ".join([_ISSUE_ROW] * len(entries))),
        [v for e in entries for v in (e.coupon_id, e.user_id, e.entry_id, e.accepted_ms)],
    )
    return int(cur.rowcount)


async def _count_issued(cur: aiomysql.Cursor, coupon_id: int, created: int) -> None:
    # The CHECK on coupons makes this fail, and the batch roll back, if it would pass the cap.
    await cur.execute(
        "UPDATE coupons SET issued_quantity = issued_quantity + %s WHERE id = %s",
        (created, coupon_id),
    )


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
        # The row count, not len(take): it stays equal to the rows created even if a row
        # appeared since the read above.
        await _count_issued(cur, coupon_id, await _insert_issues(cur, take))
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
    async with transaction(pool) as cur:
        groups = _by_coupon(entries)
        known = await _lock_coupons(cur, [cid for cid, _ in groups])
        for coupon_id, group in groups:
            issued = set()
            if coupon_id in known:
                issued = await _issued_users(cur, coupon_id, sorted({e.user_id for e in group}))
            result.already_issued.extend(e for e in group if e.user_id in issued)
            dead = [e for e in group if e.user_id not in issued]
            if dead:
                await cur.executemany(
                    INSERT_DEAD_LETTERS,
                    [(e.coupon_id, e.entry_id, e.user_id, reason) for e in dead],
                )
                result.to_dead_letter.extend(dead)
    return result
