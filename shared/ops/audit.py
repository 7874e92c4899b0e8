"""The audit log of admin changes: who did what, when, with the values before and after.

Every operation that changes a coupon takes an :class:`Actor` and records itself here, so
neither the admin API nor couponctl nor the worker's automatic retirement can change anything
without a record. A change made in a MySQL transaction records itself in that transaction
(:func:`shared.mysql.audit_log.append`); a change made in Redis alone (dead-letter replay,
reconcile repair, rebuild) is recorded right after it with :func:`record`.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Any

import aiomysql
import structlog

from shared.errors import Unavailable
from shared.mysql import audit_log
from shared.mysql.audit_log import AuditEntry
from shared.mysql.pool import transaction

log = structlog.get_logger(__name__)

ORIGINS = ("admin-api", "couponctl", "worker")

# Lists in a record (entry ids, user ids) are cut to this many, with the full count beside them:
# the record says what was done, and a repair of a million entries must not be a 30 MB row.
MAX_LISTED = 100


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change, and through what."""

    name: str
    origin: str

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            raise ValueError(f"an actor's origin is one of {ORIGINS}, not {self.origin!r}")

    @classmethod
    def operator(cls, configured: str | None) -> Actor:
        """couponctl's operator: ``COUPON_OPERATOR``, else the login name running it."""
        return cls(configured or getpass.getuser(), "couponctl")

    def entry(
        self, action: str, coupon_id: int | None, *, before: Any = None, after: Any = None
    ) -> AuditEntry:
        return AuditEntry(self.name, self.origin, action, coupon_id, before, after)


async def record(
    pool: aiomysql.Pool,
    actor: Actor,
    action: str,
    coupon_id: int | None,
    *,
    before: Any = None,
    after: Any = None,
) -> None:
    """Record a change already made outside MySQL. Should MySQL refuse, the change stands but
    the caller is told (503) and the whole record goes to the error log, so it is not lost."""
    entry = actor.entry(action, coupon_id, before=before, after=after)
    try:
        async with transaction(pool) as cur:
            await audit_log.append(cur, entry)
    except Exception as exc:
        log.error("audit_record_failed", record=repr(entry), error=repr(exc))
        raise Unavailable(
            f"the {action} was done, but MySQL did not take its audit record: {exc}"
        ) from exc


def listed(items: list[Any]) -> dict[str, Any]:
    """A list for a record: its length, and its first :data:`MAX_LISTED` items."""
    return {"count": len(items), "items": items[:MAX_LISTED]}


async def entries(
    pool: aiomysql.Pool, *, coupon_id: int | None = None, after_id: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    """The records, oldest first, a page at a time."""
    return await audit_log.page(pool, coupon_id=coupon_id, after_id=after_id, limit=limit)
