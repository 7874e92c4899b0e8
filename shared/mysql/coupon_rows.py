"""The ``coupons`` table and the reads of a coupon's history that the operations need.

The writes of issuing (``coupon_issues``, ``issued_quantity``) belong to the issue store; this
module holds the coupon rows themselves (insert, lock, update, read) and the whole-coupon reads
that rebuild, reconcile and the counters take from MySQL.
"""

from __future__ import annotations

import dataclasses

import aiomysql
import pymysql

from shared.coupon_requests import NewCoupon
from shared.model import COUPON_TYPE, Coupon, utc_naive
from shared.mysql import audit_log
from shared.mysql.audit_log import AuditEntry
from shared.mysql.issue_store import INSERT_DEAD_LETTERS
from shared.mysql.pool import snapshot, transaction

_DUPLICATE_KEY = 1062
# How long a creation's Idempotency-Key is kept: far longer than any client retries.
IDEMPOTENCY_KEY_HOURS = 24


async def insert_coupon(pool: aiomysql.Pool, new: NewCoupon, created: AuditEntry) -> int:
    """Insert a coupon row and its audit record (``created``, whose coupon id is filled in);
    returns its id."""
    async with transaction(pool) as cur:
        coupon_id = await _insert(cur, new)
        await _record(cur, created, coupon_id)
        return coupon_id


async def insert_coupon_once(
    pool: aiomysql.Pool, new: NewCoupon, key: str, created: AuditEntry
) -> tuple[int, str | None]:
    """Insert a coupon row under an Idempotency-Key, in one transaction with the key's row.

    Returns ``(id, None)`` when this call made the coupon, or ``(id, request hash)`` of the
    creation that already holds the key: one that committed earlier, or one running now (its
    key row is locked, so this call waits for its commit and then finds it; this call's own
    row is rolled back). Keys older than :data:`IDEMPOTENCY_KEY_HOURS` are deleted first.
    """
    # Its own transaction: the range it locks must not be held while the key is inserted,
    # or two creations racing on one key would deadlock on each other's gap locks.
    async with transaction(pool) as cur:
        await cur.execute(
            "DELETE FROM coupon_create_keys WHERE date_created < NOW(6) - INTERVAL %s HOUR",
            (IDEMPOTENCY_KEY_HOURS,),
        )
    for _ in range(3):  # a holder undone in between (Redis refused it) frees the key
        try:
            async with transaction(pool) as cur:
                coupon_id = await _insert(cur, new)
                await _claim_key(cur, key, new.fingerprint(), coupon_id)
                await _record(cur, created, coupon_id)
                return coupon_id, None
        except _KeyTaken:
            pass  # rolled back, this call's coupon row with it
        async with snapshot(pool) as cur:
            await cur.execute(
                "SELECT coupon_id, request_hash FROM coupon_create_keys WHERE idempotency_key = %s",
                (key,),
            )
            row = await cur.fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
    raise RuntimeError(f"Idempotency-Key {key!r} kept changing hands")


class _KeyTaken(Exception):
    """Another creation holds the Idempotency-Key."""


async def _claim_key(cur: aiomysql.Cursor, key: str, request_hash: str, coupon_id: int) -> None:
    try:
        await cur.execute(
            "INSERT INTO coupon_create_keys (idempotency_key, request_hash, coupon_id)"
            " VALUES (%s, %s, %s)",
            (key, request_hash, coupon_id),
        )
    except pymysql.err.IntegrityError as exc:
        if exc.args[0] == _DUPLICATE_KEY:
            raise _KeyTaken from None
        raise


async def _insert(cur: aiomysql.Cursor, new: NewCoupon) -> int:
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
    return int(cur.lastrowid)


async def _record(cur: aiomysql.Cursor, entry: AuditEntry, coupon_id: int) -> None:
    after = {"id": coupon_id, **entry.after} if isinstance(entry.after, dict) else entry.after
    await audit_log.append(cur, dataclasses.replace(entry, coupon_id=coupon_id, after=after))


async def delete_coupon(pool: aiomysql.Pool, coupon_id: int, undone: AuditEntry) -> None:
    """Undo a creation (its Idempotency-Key goes with it); ``undone`` records why."""
    async with transaction(pool) as cur:
        await cur.execute("DELETE FROM coupons WHERE id = %s", (coupon_id,))
        await audit_log.append(cur, undone)


# A coupon row with what its retirement kept (NULL while it lives).
_COUPON = (
    "SELECT c.*, r.reserved AS retired_reserved FROM coupons c"
    " LEFT JOIN coupon_retirements r ON r.coupon_id = c.id"
)


async def lock_coupon(cur: aiomysql.DictCursor, coupon_id: int) -> tuple[Coupon, int] | None:
    """Lock a coupon's row in the cursor's transaction: the coupon and its issued quantity."""
    await cur.execute(f"{_COUPON} WHERE c.id = %s FOR UPDATE", (coupon_id,))
    row = await cur.fetchone()
    return None if row is None else (Coupon.from_row(row), int(row["issued_quantity"]))


async def update_coupon(cur: aiomysql.Cursor, coupon: Coupon) -> None:
    """Write the changeable fields of a locked coupon row."""
    await cur.execute(
        "UPDATE coupons SET title = %s, total_quantity = %s, date_issue_start = %s,"
        " date_issue_end = %s, paused = %s WHERE id = %s",
        (
            coupon.title,
            coupon.total_quantity,
            utc_naive(coupon.date_issue_start),
            utc_naive(coupon.date_issue_end),
            int(coupon.paused),
            coupon.id,
        ),
    )


async def fetch_coupon(pool: aiomysql.Pool, coupon_id: int) -> Coupon | None:
    async with snapshot(pool, aiomysql.DictCursor) as cur:
        await cur.execute(f"{_COUPON} WHERE c.id = %s", (coupon_id,))
        row = await cur.fetchone()
    return None if row is None else Coupon.from_row(row)


async def list_coupons(
    pool: aiomysql.Pool, *, after_id: int = 0, limit: int = 100
) -> list[tuple[Coupon, int]]:
    """Coupons by id, a page at a time, each with its ``issued_quantity``."""
    async with snapshot(pool, aiomysql.DictCursor) as cur:
        await cur.execute(f"{_COUPON} WHERE c.id > %s ORDER BY c.id LIMIT %s", (after_id, limit))
        rows = await cur.fetchall()
    return [(Coupon.from_row(row), int(row["issued_quantity"])) for row in rows]


async def coupon_ids(pool: aiomysql.Pool) -> list[int]:
    async with snapshot(pool) as cur:
        await cur.execute("SELECT id FROM coupons ORDER BY id")
        return [int(row[0]) for row in await cur.fetchall()]


async def any_coupon(pool: aiomysql.Pool) -> bool:
    async with snapshot(pool) as cur:
        await cur.execute("SELECT EXISTS (SELECT 1 FROM coupons)")
        (found,) = await cur.fetchone()
    return bool(found)


async def issue_counts(pool: aiomysql.Pool, coupon_id: int) -> tuple[int, int] | None:
    """``(issued_quantity, rows in coupon_issues)`` read in one snapshot; None: no coupon."""
    async with snapshot(pool) as cur:
        await cur.execute(
            "SELECT c.issued_quantity, (SELECT COUNT(*) FROM coupon_issues i"
            " WHERE i.coupon_id = c.id) FROM coupons c WHERE c.id = %s",
            (coupon_id,),
        )
        row = await cur.fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


async def issued_view(pool: aiomysql.Pool, coupon_id: int) -> tuple[set[int], int] | None:
    """The users with a row and the ``issued_quantity`` column, in one snapshot; None: no
    coupon."""
    async with snapshot(pool) as cur:
        await cur.execute("SELECT issued_quantity FROM coupons WHERE id = %s", (coupon_id,))
        row = await cur.fetchone()
        if row is None:
            return None
        await cur.execute("SELECT user_id FROM coupon_issues WHERE coupon_id = %s", (coupon_id,))
        users = {int(r[0]) for r in await cur.fetchall()}
    return users, int(row[0])


async def issued_users(pool: aiomysql.Pool, coupon_id: int) -> set[int]:
    """The users with a row for the coupon."""
    async with snapshot(pool) as cur:
        await cur.execute("SELECT user_id FROM coupon_issues WHERE coupon_id = %s", (coupon_id,))
        return {int(row[0]) for row in await cur.fetchall()}


async def dead_request_ids(pool: aiomysql.Pool, coupon_id: int) -> set[str]:
    """The stream entry ids of a coupon's dead-lettered requests."""
    async with snapshot(pool) as cur:
        await cur.execute(
            "SELECT request_id FROM coupon_issue_dead_letters WHERE coupon_id = %s", (coupon_id,)
        )
        return {str(row[0]) for row in await cur.fetchall()}


async def recount_issued(pool: aiomysql.Pool, coupon_id: int) -> None:
    """Set ``issued_quantity`` to the number of rows, under the coupon's row lock."""
    async with transaction(pool) as cur:
        await cur.execute("SELECT id FROM coupons WHERE id = %s FOR UPDATE", (coupon_id,))
        await cur.execute(
            "UPDATE coupons SET issued_quantity = (SELECT COUNT(*) FROM coupon_issues"
            " WHERE coupon_id = %s) WHERE id = %s",
            (coupon_id, coupon_id),
        )


async def retire(
    cur: aiomysql.Cursor,
    coupon_id: int,
    *,
    requested: int,
    reserved: int,
    dead_letters: list[tuple[str, int | None, str]],
) -> None:
    """Record a coupon's retirement in the cursor's transaction, with the counters its Redis
    state held and its dead letters ``(request id, user id, reason)`` (kept once each)."""
    if dead_letters:
        await cur.executemany(
            INSERT_DEAD_LETTERS, [(coupon_id, *letter) for letter in dead_letters]
        )
    await cur.execute(
        "INSERT INTO coupon_retirements (coupon_id, requested, reserved, dead_lettered)"
        " VALUES (%s, %s, %s, %s)",
        (coupon_id, requested, reserved, len(dead_letters)),
    )


async def retirement(pool: aiomysql.Pool, coupon_id: int) -> dict[str, int] | None:
    """What a retired coupon's Redis state held (requested, reserved, dead_lettered); None
    while it lives."""
    async with snapshot(pool, aiomysql.DictCursor) as cur:
        return await retirement_in(cur, coupon_id)


async def retirement_in(cur: aiomysql.DictCursor, coupon_id: int) -> dict[str, int] | None:
    """:func:`retirement`, read in the cursor's transaction."""
    await cur.execute(
        "SELECT requested, reserved, dead_lettered FROM coupon_retirements WHERE coupon_id = %s",
        (coupon_id,),
    )
    row = await cur.fetchone()
    return None if row is None else {name: int(value) for name, value in row.items()}


async def retired_outcome(pool: aiomysql.Pool, coupon_id: int, user_id: int) -> str | None:
    """A user's outcome in a retired coupon, from MySQL alone: "issued" (a row), "failed"
    (dead-lettered, no row) or None (never requested)."""
    async with snapshot(pool) as cur:
        await cur.execute(
            "SELECT EXISTS (SELECT 1 FROM coupon_issues WHERE coupon_id = %s AND user_id = %s),"
            " EXISTS (SELECT 1 FROM coupon_issue_dead_letters"
            " WHERE coupon_id = %s AND user_id = %s)",
            (coupon_id, user_id, coupon_id, user_id),
        )
        issued, failed = await cur.fetchone()
    if issued:
        return "issued"
    return "failed" if failed else None


async def issued_quantities(pool: aiomysql.Pool, coupon_ids: list[int]) -> dict[int, int]:
    """``issued_quantity`` of each coupon named (one indexed read however many): the counter
    each worker transaction raises with the rows it writes, so it never lags them."""
    if not coupon_ids:
        return {}
    marks = ", ".join(["%s"] * len(coupon_ids))
    async with snapshot(pool) as cur:
        await cur.execute(
            f"SELECT id, issued_quantity FROM coupons WHERE id IN ({marks})",
            coupon_ids,
        )
        rows = await cur.fetchall()
    return {int(coupon_id): int(issued) for coupon_id, issued in rows}


@dataclasses.dataclass(frozen=True, slots=True)
class IssueTimings:
    """Of the ``coupon_issues`` rows of one coupon written since a mark: how many, and how long
    each took from its acceptance (Redis's clock) to its row (MySQL's)."""

    rows: int
    mean_ms: float
    max_ms: float


async def newest_issue_row(pool: aiomysql.Pool) -> int:
    """The highest ``coupon_issues`` id (0 for none): the mark to read new rows after."""
    async with snapshot(pool) as cur:
        await cur.execute("SELECT COALESCE(MAX(id), 0) FROM coupon_issues")
        (newest,) = await cur.fetchone()
    return int(newest)


async def issue_timings_since(
    pool: aiomysql.Pool, after_id: int
) -> tuple[int, dict[int, IssueTimings]]:
    """The rows written after row ``after_id``, per coupon, and the new mark. A range of the
    primary key, so it reads only the new rows. A row whose id was taken before the mark but
    committed after it is not counted here: these are samples for a chart, not counters."""
    async with snapshot(pool) as cur:
        await cur.execute(
            "SELECT coupon_id, COUNT(*), MAX(id),"
            " AVG(TIMESTAMPDIFF(MICROSECOND, date_issued, date_created)),"
            " MAX(TIMESTAMPDIFF(MICROSECOND, date_issued, date_created))"
            " FROM coupon_issues WHERE id > %s GROUP BY coupon_id",
            (after_id,),
        )
        rows = await cur.fetchall()
    newest = after_id
    timings = {}
    for coupon_id, count, last_id, mean_us, max_us in rows:
        newest = max(newest, int(last_id))
        timings[int(coupon_id)] = IssueTimings(
            rows=int(count),
            mean_ms=max(float(mean_us), 0.0) / 1000,
            max_ms=max(float(max_us), 0.0) / 1000,
        )
    return newest, timings
