"""The ``admin_audit`` table: who changed what, when, and the values before and after.

Rows are appended, never changed. :func:`append` writes one in the caller's transaction, so a
change made in MySQL is recorded if and only if it commits; :func:`page` reads them back in the
order they were written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomysql
import orjson

from shared.model import iso
from shared.mysql.pool import snapshot


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One recorded change, as :func:`append` takes it."""

    actor: str
    """Who: the admin token's name, or the operator who ran couponctl."""
    origin: str
    """Through what: ``admin-api``, ``couponctl`` or ``worker`` (automatic retirement)."""
    action: str
    coupon_id: int | None
    before: Any = None
    """The values the change replaced (JSON-serialisable), None when there were none."""
    after: Any = None
    """The values it wrote, or what it did (JSON-serialisable)."""


async def append(cur: aiomysql.Cursor, entry: AuditEntry) -> None:
    """Record ``entry`` in the cursor's transaction."""
    await cur.execute(
        "INSERT INTO admin_audit (actor, origin, action, coupon_id, before_values, after_values)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (
            entry.actor,
            entry.origin,
            entry.action,
            entry.coupon_id,
            _json(entry.before),
            _json(entry.after),
        ),
    )


async def page(
    pool: aiomysql.Pool, *, coupon_id: int | None = None, after_id: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    """Entries with an id above ``after_id``, oldest first, of one coupon or of all."""
    where, args = "id > %s", [after_id]
    if coupon_id is not None:
        where += " AND coupon_id = %s"
        args.append(coupon_id)
    async with snapshot(pool, aiomysql.DictCursor) as cur:
        await cur.execute(
            "SELECT id, date_created, actor, origin, action, coupon_id, before_values,"
            f" after_values FROM admin_audit WHERE {where} ORDER BY id LIMIT %s",
            (*args, limit),
        )
        rows = await cur.fetchall()
    return [
        {
            "id": int(row["id"]),
            "at": iso(row["date_created"].replace(tzinfo=UTC)),
            "actor": row["actor"],
            "origin": row["origin"],
            "action": row["action"],
            "coupon_id": row["coupon_id"],
            "before": _loads(row["before_values"]),
            "after": _loads(row["after_values"]),
        }
        for row in rows
    ]


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return orjson.dumps(value, default=_default).decode()


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"cannot record {type(value).__name__} in the audit log")


def _loads(raw: str | bytes | None) -> Any:
    return None if raw is None else orjson.loads(raw)
