"""Reading whole request streams in bounded pages (rebuild, reconcile and dead-letter tools)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.coupons import MAX_ID

PAGE = 1000


@dataclass(frozen=True, slots=True)
class StreamEntry:
    entry_id: str
    fields: dict[str, str]

    @property
    def user_id(self) -> int | None:
        """The ``u`` field as an id, or None when the entry is malformed."""
        raw = self.fields.get("u", "")
        if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_ID:
            return int(raw)
        return None


async def scan(redis: Redis, stream: str, *, page: int = PAGE) -> AsyncIterator[list[StreamEntry]]:
    """Every entry of ``stream``, oldest first, ``page`` at a time."""
    start = "-"
    while True:
        # decode_responses=True: ids and fields are str (redis-py's stubs do not know that).
        raw: Any = await redis.xrange(stream, min=start, max="+", count=page)
        batch = [StreamEntry(entry_id, fields or {}) for entry_id, fields in raw]
        if not batch:
            return
        yield batch
        if len(batch) < page:
            return
        start = "(" + batch[-1].entry_id


async def unsettled_ids(redis: Redis, stream: str) -> set[str]:
    """Entries the ``issuers`` group has not settled: pending (delivered, not acknowledged) or
    not yet delivered at all (after the group's last-delivered id)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return set()
    group = next((g for g in groups if g["name"] == keys.GROUP), None)
    if group is None:  # no group yet: nothing was ever delivered
        return {e.entry_id async for batch in scan(redis, stream) for e in batch}
    unsettled: set[str] = set()
    start = "-"
    while True:
        rows = await redis.xpending_range(stream, keys.GROUP, min=start, max="+", count=PAGE)
        unsettled.update(str(row["message_id"]) for row in rows)
        if len(rows) < PAGE:
            break
        start = "(" + str(rows[-1]["message_id"])
    last = str(group["last-delivered-id"])
    async for batch in scan(redis, stream):
        unsettled.update(e.entry_id for e in batch if _after(e.entry_id, last))
    return unsettled


def _after(entry_id: str, other: str) -> bool:
    return _key(entry_id) > _key(other)


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
