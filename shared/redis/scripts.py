"""The Lua scripts, kept as ``.lua`` package files and registered once per Redis client."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from shared import keys
from shared.redis.replication import ReplicaWait


class IssueResult(enum.IntEnum):
    """Per-user result codes of ``issue.lua``."""

    ACCEPTED = 0
    DUPLICATE = 1
    SOLD_OUT = 2
    NOT_STARTED = 3
    ENDED = 4
    PAUSED = 5


class ReplayResult(enum.IntEnum):
    """Result codes of ``replay.lua``."""

    QUEUED = 0
    HOLDING = 1
    SOLD_OUT = 2
    STATE_MISSING = 3
    RETIRED = 4


@dataclass(frozen=True, slots=True)
class Seal:
    """What ``retire.lua`` found: sealed (with the counters to keep) or why not."""

    sealed: bool
    state_missing: bool = False
    end_ms: int = 0
    """Too early: when the window ends (0 otherwise)."""
    pending: int = 0
    undelivered: bool = False
    requested: int = 0
    reserved: int = 0
    dead_lettered: int = 0


class UpdateStatus(enum.IntEnum):
    """Result of ``update.lua``."""

    STATE_MISSING = -1
    BELOW_RESERVED = 0
    APPLIED = 1


HEARTBEAT_INTERVAL_SECONDS = 2.0
"""How often a stream worker refreshes its member of :data:`shared.keys.WORKERS` while its loop
turns; a reader counts a worker alive when its last heartbeat is younger than
:data:`HEARTBEAT_FRESH_SECONDS` (three intervals: one late or lost beat is not a death)."""
HEARTBEAT_FRESH_SECONDS = 3 * HEARTBEAT_INTERVAL_SECONDS
HEARTBEAT_KEEP_MS = 3_600_000
"""``heartbeat.lua`` drops members silent for longer (workers killed without a clean stop)."""


def _source(name: str) -> str:
    return (resources.files("shared.redis") / "lua" / name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Reservation:
    """One user's outcome from a reservation batch."""

    result: IssueResult
    request_id: str
    accepted_ms: int
    """Redis server time of the decision; the ``t`` field of the stream entry when accepted."""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one ``issue.lua`` call decided."""

    state_missing: bool
    redis_time_ms: int
    remaining: int | None
    reservations: list[Reservation]
    replicated: bool = True
    """The replicas COUPON_REDIS_MIN_REPLICAS asks for acknowledged the call's writes in time
    (always true when it asks for none)."""


class Scripts:
    """The project's scripts bound to one Redis client (EVALSHA, loaded on first use).

    With ``replicas``, each reservation and re-claim call is followed by its ``WAIT`` on the
    same connection, and its outcome says whether the replicas confirmed it.
    """

    def __init__(self, redis: Redis, replicas: ReplicaWait | None = None) -> None:
        self._replicas = replicas
        self._redis = redis
        self._issue: AsyncScript = redis.register_script(_source("issue.lua"))
        self._release: AsyncScript = redis.register_script(_source("release.lua"))
        self._update: AsyncScript = redis.register_script(_source("update.lua"))
        self._replay: AsyncScript = redis.register_script(_source("replay.lua"))
        self._retire: AsyncScript = redis.register_script(_source("retire.lua"))
        self._heartbeat: AsyncScript = redis.register_script(_source("heartbeat.lua"))
        self._claim: AsyncScript = redis.register_script(_source("claim.lua"))

    async def reserve(self, coupon_id: int, user_ids: list[int]) -> BatchOutcome:
        """Judge a batch of users of one coupon: window, dedup, stock; XADD the accepted."""
        k = keys.CouponKeys(coupon_id)
        script_keys = [k.meta, k.users, k.requests, k.failed]
        args: list[str | int] = [coupon_id, keys.SOLD_OUT_CHANNEL, *user_ids]
        replicated = True
        raw: list[Any]
        if self._replicas is not None:
            raw, replicated = await self._replicated_call(self._issue, script_keys, args)
        else:
            raw = await self._issue(keys=script_keys, args=args)
        status, now_ms, remaining = int(raw[0]), int(raw[1]), int(raw[2])
        if status == 1:
            return BatchOutcome(True, now_ms, None, [], replicated)
        flat = raw[3:]
        reservations = [
            Reservation(IssueResult(int(flat[i])), _text(flat[i + 1]), now_ms)
            for i in range(0, len(flat), 2)
        ]
        remaining_or_none = None if remaining < 0 else remaining
        return BatchOutcome(False, now_ms, remaining_or_none, reservations, replicated)

    async def claim_replicated(
        self, coupon_id: int, consumer: str, held: list[tuple[str, int]]
    ) -> tuple[set[str], bool]:
        """Claim again the (entry id, user id) pairs still pending as those very requests, and
        WAIT for the replicas; (the ids claimed, whether the replicas confirmed them). See
        ``claim.lua``: only the claimed ids may become rows."""
        args: list[Any] = [keys.GROUP, consumer]
        for entry_id, user_id in held:
            args += [entry_id, user_id]
        stream = keys.CouponKeys(coupon_id).requests
        if self._replicas is not None:
            reply, confirmed = await self._replicated_call(self._claim, [stream], args)
        else:
            reply, confirmed = await self._claim(keys=[stream], args=args), True
        return {_text(entry_id) for entry_id in reply}, confirmed

    async def _replicated_call(
        self, script: AsyncScript, script_keys: list[str], args: list[Any]
    ) -> tuple[Any, bool]:
        """EVALSHA and WAIT as one pipeline; a NOSCRIPT reply (a restarted or failed-over
        Redis that has not seen the script) loads it and runs the call once more, which is
        safe: a NOSCRIPT call ran nothing."""
        replicas = self._replicas
        assert replicas is not None

        command = ("EVALSHA", script.sha, len(script_keys), *script_keys, *args)
        try:
            done = await replicas.run(script_keys[0], *command)
        except NoScriptError:
            await self._redis.script_load(script.script)
            done = await replicas.run(script_keys[0], *command)
        return done.reply, done.confirmed

    async def release(
        self,
        coupon_id: int,
        entry_id: str,
        user_id: int | None,
        reason: str,
        deliveries: int,
    ) -> bool:
        """Dead-letter a pending entry and release its slot; False if it was no longer pending."""
        k = keys.CouponKeys(coupon_id)
        done = await self._release(
            keys=[k.users, k.requests, k.dead, k.failed],
            args=[
                keys.GROUP,
                entry_id,
                "" if user_id is None else user_id,
                reason,
                deliveries,
                keys.CHANGES_CHANNEL,
                coupon_id,
            ],
        )
        return bool(done)

    async def update(
        self, coupon_id: int, total: int | None, meta: dict[str, str | int]
    ) -> tuple[UpdateStatus, int]:
        """Rewrite the snapshot unless ``total`` is below the slots taken; (status, reserved)."""
        k = keys.CouponKeys(coupon_id)
        args: list[str | int] = [-1 if total is None else total, keys.CHANGES_CHANNEL, coupon_id]
        for field, value in meta.items():
            args += [field, value]
        status, reserved = await self._update(keys=[k.meta, k.users], args=args)
        return UpdateStatus(int(status)), int(reserved)

    async def replay(
        self, coupon_id: int, user_id: int, accepted_ms: int, source_id: str
    ) -> tuple[ReplayResult, str]:
        """Re-queue a dead-lettered request for ``user_id``; (result, new entry id or "")."""
        k = keys.CouponKeys(coupon_id)
        code, entry_id = await self._replay(
            keys=[k.meta, k.users, k.requests, k.failed],
            args=[coupon_id, user_id, accepted_ms, source_id],
        )
        return ReplayResult(int(code)), _text(entry_id)

    async def seal(self, coupon_id: int, after_end_ms: int) -> Seal:
        """Seal a coupon for retirement if its window ended ``after_end_ms`` ago and every
        accepted request is settled; idempotent."""
        k = keys.CouponKeys(coupon_id)
        raw: list[Any] = await self._retire(
            keys=[k.meta, k.users, k.requests, k.dead, k.correction],
            args=[after_end_ms, keys.GROUP],
        )
        code, values = int(raw[0]), [int(value) for value in raw[1:]]
        if code == 0:
            return Seal(sealed=False, state_missing=True)
        if code == 1:
            return Seal(sealed=False, end_ms=values[0])
        if code == 2:
            return Seal(sealed=False, pending=values[0], undelivered=bool(values[1]))
        return Seal(True, requested=values[0], reserved=values[1], dead_lettered=values[2])

    async def heartbeat(self, worker: str) -> int:
        """Record that ``worker`` is alive now (Redis time, returned in ms); drop the members
        silent for longer than :data:`HEARTBEAT_KEEP_MS`."""
        now_ms = await self._heartbeat(keys=[keys.WORKERS], args=[worker, HEARTBEAT_KEEP_MS])
        return int(now_ms)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
