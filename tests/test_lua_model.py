"""The Lua scripts against a plain Python model, driven by a Hypothesis state machine.

``issue.lua`` (through :meth:`Scripts.reserve`), ``update.lua`` (:meth:`Scripts.update`) and
``release.lua`` (:meth:`Scripts.release`) run on a real Redis; the model is a few sets and
dicts that say what dedup, stock, the issue window (set relative to Redis ``TIME``) and a
release must do. After every step the result of the call, the remaining count and the whole
Redis state of the coupon (slot holders, failed users, stream length, pending entries, dead
letters) must equal the model's. Examples and steps are bounded so the test stays quick.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import hypothesis
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from shared import keys
from shared.ids import MAX_ID
from shared.redis import client as redis_client
from shared.redis.scripts import IssueResult, Scripts, UpdateStatus
from shared.settings import Settings

T = TypeVar("T")

HOUR_MS = 3_600_000
# Windows relative to Redis TIME read just before they are written. "starts_now" and
# "ends_now" sit exactly on the boundaries: start is inclusive, end exclusive.
WINDOWS = {
    "open": (-HOUR_MS, HOUR_MS, "open"),
    "starts_now": (0, HOUR_MS, "open"),
    "not_started": (HOUR_MS, 2 * HOUR_MS, "not_started"),
    "ends_now": (-HOUR_MS, 0, "ended"),
    "ended": (-2 * HOUR_MS, -HOUR_MS, "ended"),
}
CONSUMER = "model-worker"
_coupon_ids = itertools.count(9_000_000_001)

# A few users so batches repeat them, plus the largest id the API accepts.
users = st.one_of(st.integers(1, 8), st.just(MAX_ID))
totals = st.one_of(st.none(), st.integers(0, 12))
windows = st.sampled_from(sorted(WINDOWS))


@dataclass
class Meta:
    total: int | None
    window: str  # open, not_started or ended
    paused: bool


class LuaModel(RuleBasedStateMachine):
    """One coupon's Redis state next to its model."""

    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: Redis = redis_client.connect(self.redis_url, socket_timeout=5.0)
        self.scripts = Scripts(self.redis)
        self.coupon_id = next(_coupon_ids)
        self.k = keys.CouponKeys(self.coupon_id)
        self.run(self.redis.delete(*self.k.all()))
        # The model.
        self.meta: Meta | None = None
        self.holders: set[int] = set()
        self.failed: set[int] = set()
        self.entries: dict[str, int] = {}  # every XADDed entry id -> its user
        self.undelivered: list[str] = []
        self.pending: set[str] = set()
        self.dead_letters = 0

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self.redis.delete(*self.k.all()))
            self.run(self.redis.aclose())
        finally:
            self.loop.close()

    # ---------------------------------------------------------------------------------------
    # writing meta the way coupons.py and update.lua do

    def meta_fields(self, total: int | None, window: str, paused: bool) -> dict[str, str | int]:
        now_ms = self.redis_time_ms()
        start, end, _ = WINDOWS[window]
        return {
            "total": -1 if total is None else total,
            "start_ms": now_ms + start,
            "end_ms": now_ms + end,
            "paused": int(paused),
        }

    def redis_time_ms(self) -> int:
        seconds, micros = self.run(self.redis.time())
        return int(seconds) * 1000 + int(micros) // 1000

    @initialize(total=totals, window=windows, paused=st.booleans())
    def create(self, total: int | None, window: str, paused: bool) -> None:
        self.run(self.redis.hset(self.k.meta, mapping=self.meta_fields(total, window, paused)))  # type: ignore[arg-type]
        self.run(self.redis.xgroup_create(self.k.requests, keys.GROUP, id="0", mkstream=True))
        self.meta = Meta(total, WINDOWS[window][2], paused)

    # ---------------------------------------------------------------------------------------
    # rules

    @rule(batch=st.lists(users, min_size=1, max_size=6))
    def reserve(self, batch: list[int]) -> None:
        outcome = self.run(self.scripts.reserve(self.coupon_id, batch))
        meta = self.meta
        if meta is None:
            assert outcome.state_missing
            assert outcome.reservations == []
            return
        assert not outcome.state_missing
        results = [reservation.result for reservation in outcome.reservations]
        if meta.paused or meta.window != "open":
            code = (
                IssueResult.PAUSED
                if meta.paused
                else IssueResult.NOT_STARTED
                if meta.window == "not_started"
                else IssueResult.ENDED
            )
            assert results == [code] * len(batch)
            assert all(r.request_id == "" for r in outcome.reservations)
            assert outcome.remaining == self.remaining()
            return
        expected: list[IssueResult] = []
        seen: set[int] = set()
        for user in batch:
            if user in self.holders or user in seen:
                expected.append(IssueResult.DUPLICATE)
            elif meta.total is not None and len(self.holders) >= meta.total:
                expected.append(IssueResult.SOLD_OUT)
            else:
                expected.append(IssueResult.ACCEPTED)
                self.holders.add(user)
                self.failed.discard(user)
            seen.add(user)
        assert results == expected, (batch, results, expected)
        for user, reservation in zip(batch, outcome.reservations, strict=True):
            if reservation.result is IssueResult.ACCEPTED:
                assert reservation.request_id
                assert reservation.request_id not in self.entries
                self.entries[reservation.request_id] = user
                self.undelivered.append(reservation.request_id)
            else:
                assert reservation.request_id == ""
        assert outcome.remaining == self.remaining()

    @rule(total=totals, window=windows, paused=st.booleans())
    def update(self, total: int | None, window: str, paused: bool) -> None:
        fields = self.meta_fields(total, window, paused)
        status, reserved = self.run(self.scripts.update(self.coupon_id, total, fields))
        if self.meta is None:
            assert (status, reserved) == (UpdateStatus.STATE_MISSING, 0)
            return
        assert reserved == len(self.holders)
        if total is not None and total < len(self.holders):
            assert status is UpdateStatus.BELOW_RESERVED
            return
        assert status is UpdateStatus.APPLIED
        self.meta = Meta(total, WINDOWS[window][2], paused)

    @precondition(lambda self: self.undelivered)
    @rule()
    def deliver(self) -> None:
        """A worker reads the oldest undelivered entry: it becomes pending in the group."""
        reply: Any = self.run(
            self.redis.xreadgroup(keys.GROUP, CONSUMER, {self.k.requests: ">"}, count=1)
        )
        entry_id = reply[0][1][0][0]
        assert entry_id == self.undelivered.pop(0)
        self.pending.add(entry_id)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        """The worker committed the row: the entry is acknowledged, the slot stays taken."""
        entry_id = data.draw(st.sampled_from(sorted(self.pending)))
        assert self.run(self.redis.xack(self.k.requests, keys.GROUP, entry_id)) == 1
        self.pending.discard(entry_id)

    @precondition(lambda self: self.entries)
    @rule(data=st.data(), deliveries=st.integers(1, 10))
    def release(self, data: st.DataObject, deliveries: int) -> None:
        """Dead-letter an entry: only a pending one is released, and only once."""
        entry_id = data.draw(st.sampled_from(sorted(self.entries)))
        user = self.entries[entry_id]
        done = self.run(
            self.scripts.release(self.coupon_id, entry_id, user, "model_test", deliveries)
        )
        assert done is (entry_id in self.pending)
        if done:
            self.pending.discard(entry_id)
            self.holders.discard(user)
            self.failed.add(user)
            self.dead_letters += 1

    @precondition(lambda self: self.meta is not None)
    @rule()
    def lose_meta(self) -> None:
        """Redis lost the snapshot: nothing may be judged or changed until it is rebuilt."""
        self.run(self.redis.delete(self.k.meta))
        self.meta = None

    @precondition(lambda self: self.meta is None)
    @rule(extra=st.one_of(st.none(), st.integers(0, 4)), window=windows, paused=st.booleans())
    def rebuild_meta(self, extra: int | None, window: str, paused: bool) -> None:
        """An operator rebuilds the snapshot; its total never falls below the slots taken."""
        total = None if extra is None else len(self.holders) + extra
        self.run(self.redis.hset(self.k.meta, mapping=self.meta_fields(total, window, paused)))  # type: ignore[arg-type]
        self.meta = Meta(total, WINDOWS[window][2], paused)

    # ---------------------------------------------------------------------------------------
    # the whole state, after every step

    def remaining(self) -> int | None:
        assert self.meta is not None
        if self.meta.total is None:
            return None
        return max(self.meta.total - len(self.holders), 0)

    @invariant()
    def redis_matches_the_model(self) -> None:
        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.smembers(self.k.users)
                pipe.smembers(self.k.failed)
                pipe.xlen(self.k.requests)
                pipe.xlen(self.k.dead)
                return list(await pipe.execute())

        if not self.run(self.redis.exists(self.k.requests)):
            return  # before initialisation
        holders, failed, length, dead = self.run(read())
        assert {int(user) for user in holders} == self.holders
        assert {int(user) for user in failed} == self.failed
        assert length == len(self.entries)
        assert dead == self.dead_letters
        summary: Any = self.run(self.redis.xpending(self.k.requests, keys.GROUP))
        assert summary["pending"] == len(self.pending)


@pytest.fixture
def model_redis_url(settings: Settings) -> str:
    return settings.redis_url


def test_lua_scripts_behave_like_the_model(model_redis_url: str) -> None:
    LuaModel.redis_url = model_redis_url
    run_state_machine_as_test(
        LuaModel,
        settings=hypothesis.settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
