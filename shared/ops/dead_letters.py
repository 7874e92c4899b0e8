"""Operator tools for dead letters (``couponctl dead list | replay | release``).

- list: what was dead-lettered, why, and where its user stands now;
- replay: queue a dead-lettered request again (a new stream entry with the original acceptance
  time), if its user holds no slot and stock remains; the worker then issues it as usual;
- release: give up on a request that is still pending (say, held by a consumer that will never
  come back) right away instead of waiting for the delivery limit: MySQL decides first (a row
  already committed wins), then Redis frees the slot and marks the user failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiomysql
from redis.asyncio import Redis

from shared import keys
from shared.errors import InvalidRequest
from shared.mysql import issue_store
from shared.mysql.issue_store import Entry, Malformed
from shared.ops import audit
from shared.ops.audit import Actor
from shared.redis.scripts import Scripts
from shared.redis.streams import StreamEntry, scan


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    source_id: str
    user_id: int | None
    reason: str
    deliveries: int
    accepted_ms: int | None

    @classmethod
    def from_entry(cls, entry: StreamEntry) -> DeadLetter:
        original = StreamEntry(entry.entry_id, {"u": entry.fields.get("f_u", "")})
        accepted = entry.fields.get("f_t", "")
        return cls(
            entry_id=entry.entry_id,
            source_id=entry.fields.get("source_id", ""),
            user_id=original.user_id,
            reason=entry.fields.get("reason", ""),
            deliveries=int(entry.fields.get("deliveries", "0") or 0),
            accepted_ms=int(accepted) if accepted.isdigit() else None,
        )


async def list_dead(redis: Redis, coupon_id: int) -> list[dict[str, Any]]:
    """Every dead letter of a coupon, with its user's current status."""
    k = keys.CouponKeys(coupon_id)
    letters = [DeadLetter.from_entry(e) async for batch in scan(redis, k.dead) for e in batch]
    rows = []
    for letter in letters:
        rows.append({**_as_dict(letter), "user_status": await _user_status(redis, k, letter)})
    return rows


async def replay(
    pool: aiomysql.Pool,
    redis: Redis,
    coupon_id: int,
    entry_ids: list[str] | None = None,
    *,
    actor: Actor,
) -> list[dict[str, Any]]:
    """Re-queue dead letters (all of them, or those named); one result per letter, and one
    audit record of the letters queued."""
    k = keys.CouponKeys(coupon_id)
    scripts = Scripts(redis)
    results: list[dict[str, Any]] = []
    async for batch in scan(redis, k.dead):
        for entry in batch:
            if entry_ids is not None and entry.entry_id not in entry_ids:
                continue
            letter = DeadLetter.from_entry(entry)
            if letter.user_id is None or letter.accepted_ms is None:
                results.append({"entry_id": letter.entry_id, "result": "malformed"})
                continue
            code, new_id = await scripts.replay(
                coupon_id, letter.user_id, letter.accepted_ms, letter.source_id
            )
            results.append(
                {
                    "entry_id": letter.entry_id,
                    "user_id": letter.user_id,
                    "result": code.name.lower(),
                    "request_id": new_id or None,
                }
            )
    if entry_ids is not None:
        missing = set(entry_ids) - {r["entry_id"] for r in results}
        if missing:
            raise InvalidRequest(f"no such dead letter: {', '.join(sorted(missing))}")
    queued = [r for r in results if r["result"] == "queued"]
    if queued:
        await audit.record(pool, actor, "dead_replay", coupon_id, after=audit.listed(queued))
    return results


async def release_pending(
    pool: aiomysql.Pool,
    redis: Redis,
    coupon_id: int,
    entry_id: str,
    reason: str = "operator",
    *,
    actor: Actor,
) -> str:
    """Dead-letter one pending request now. Returns "issued" (its row was committed meanwhile),
    "dead_lettered", or "not_pending" (already settled, or not yet delivered: nothing done)."""
    k = keys.CouponKeys(coupon_id)
    found = await redis.xrange(k.requests, min=entry_id, max=entry_id)
    if not found:
        raise InvalidRequest(f"no request {entry_id} in coupon {coupon_id}'s stream")
    fields: Any = found[0][1]
    pending = await redis.xpending_range(
        k.requests, keys.GROUP, min=entry_id, max=entry_id, count=1
    )
    if not pending:
        # Settled already, or not delivered yet: the worker decides those, not the operator.
        return "not_pending"
    outcome = await _release(pool, redis, k, entry_id, fields, reason=reason)
    if outcome != "not_pending":
        after = {"entry_id": entry_id, "reason": reason, "result": outcome}
        await audit.record(pool, actor, "dead_release", coupon_id, after=after)
    return outcome


async def _release(
    pool: aiomysql.Pool,
    redis: Redis,
    k: keys.CouponKeys,
    entry_id: str,
    fields: Any,
    *,
    reason: str,
) -> str:
    try:
        entry: Entry | None = Entry.parse(k.coupon_id, entry_id, fields)
    except Malformed:
        entry = None
    if entry is not None:
        decided = await issue_store.dead_letter(pool, [entry], reason)
        if decided.already_issued:  # committed meanwhile: finish it as issued
            async with redis.pipeline(transaction=True) as pipe:
                pipe.sadd(k.issued, entry.user_id)
                pipe.xack(k.requests, keys.GROUP, entry_id)
                await pipe.execute()
            return "issued"
    user = entry.user_id if entry is not None else StreamEntry(entry_id, fields).user_id
    done = await Scripts(redis).release(k.coupon_id, entry_id, user, reason, 0)
    return "dead_lettered" if done else "not_pending"


async def _user_status(redis: Redis, k: keys.CouponKeys, letter: DeadLetter) -> str:
    if letter.user_id is None:
        return "-"
    if await redis.sismember(k.issued, str(letter.user_id)):
        return "issued"
    if await redis.sismember(k.users, str(letter.user_id)):
        return "pending"
    return "failed"


def _as_dict(letter: DeadLetter) -> dict[str, Any]:
    return {
        "entry_id": letter.entry_id,
        "source_id": letter.source_id,
        "user_id": letter.user_id,
        "reason": letter.reason,
        "deliveries": letter.deliveries,
        "accepted_ms": letter.accepted_ms,
    }
