"""Contention: thousands of users clicking at once through the HTTP gateway, then a drain.

The original Java system never checked the outcome of its load runs. Here every answer
is recorded and the end state is compared with it: exactly the total issued, one row per
winner, a row for every 202 and none for anyone who was only refused, and no 5xx at all.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiomysql
import orjson
from aiohttp.test_utils import TestClient

from tests.helpers import drain, issued_quantity

# Bounded concurrency: enough in flight at once that the gateway coalesces large batches.
CONCURRENCY = 300
REFUSALS = {"DUPLICATED_COUPON_ISSUE", "INVALID_COUPON_ISSUE_QUANTITY"}


@dataclass
class Answers:
    """Every answer the gateway gave, per (coupon, user)."""

    by_request: dict[tuple[int, int], list[tuple[int, str | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def users(self, coupon_id: int) -> set[int]:
        return {user for (coupon, user) in self.by_request if coupon == coupon_id}

    def accepted(self, coupon_id: int) -> set[int]:
        return {
            user
            for (coupon, user), answers in self.by_request.items()
            if coupon == coupon_id and any(status == 202 for status, _ in answers)
        }

    def all(self) -> list[tuple[int, str | None]]:
        return [answer for answers in self.by_request.values() for answer in answers]


async def _fire(client: TestClient[Any, Any], clicks: list[tuple[int, int]]) -> Answers:
    """Send every (coupon, user) click concurrently; record the status and code of each."""
    gate = asyncio.Semaphore(CONCURRENCY)
    answers = Answers()

    async def click(coupon_id: int, user_id: int) -> None:
        async with gate:
            response = await client.post(
                f"/v1/coupons/{coupon_id}/issues", json={"user_id": user_id}
            )
            raw = await response.read()
        try:
            code = orjson.loads(raw).get("code")
        except (orjson.JSONDecodeError, AttributeError):
            code = None
        answers.by_request[coupon_id, user_id].append((response.status, code))

    await asyncio.gather(*(click(c, u) for c, u in clicks))
    return answers


async def _rows(pool: aiomysql.Pool, coupon_id: int) -> list[int]:
    """User ids of the coupon's rows (duplicates kept, so a double issue shows)."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT user_id FROM coupon_issues WHERE coupon_id = %s", (coupon_id,))
        users = [int(user) for (user,) in await cur.fetchall()]
        await conn.rollback()
    return users


def _assert_only_202_or_refusal(answers: Answers) -> None:
    """Every answer is a 202 or a 409 duplicate / sold out; never a 5xx or anything else."""
    unexpected = [a for a in answers.all() if a[0] != 202 and (a[0], a[1]) not in _REFUSED]
    assert not unexpected, f"unexpected answers: {sorted(set(unexpected))[:10]}"


_REFUSED = {(409, code) for code in REFUSALS}


def _assert_one_202_per_user(answers: Answers) -> None:
    twice = [key for key, got in answers.by_request.items() if sum(s == 202 for s, _ in got) > 1]
    assert not twice, f"users accepted more than once: {twice[:10]}"


async def _assert_outcome(
    pool: aiomysql.Pool, coupon_id: int, answers: Answers, expected_winners: int
) -> set[int]:
    """Rows match the 202s exactly; returns the winners."""
    winners = answers.accepted(coupon_id)
    assert len(winners) == expected_winners
    rows = await _rows(pool, coupon_id)
    assert len(rows) == expected_winners
    assert len(set(rows)) == len(rows), "a user holds two rows"
    assert set(rows) == winners, "rows differ from the users who got a 202"
    assert await issued_quantity(pool, coupon_id) == expected_winners
    return winners


async def test_5000_users_clicking_1_to_3_times_issue_exactly_100(
    client, redis, pool, settings, make_coupon, check_invariants
):
    """The issue's scenario: 5,000 users, 1-3 clicks each, total 100, all at once."""
    coupon = await make_coupon(total=100)
    rng = random.Random(20_251_125)
    clicks = [(coupon.id, user) for user in range(1, 5001) for _ in range(rng.randint(1, 3))]
    # Interleave everyone's clicks, as a real crowd would.
    rng.shuffle(clicks)

    answers = await _fire(client, clicks)
    await drain(redis, pool, settings)

    _assert_only_202_or_refusal(answers)
    _assert_one_202_per_user(answers)
    winners = await _assert_outcome(pool, coupon.id, answers, expected_winners=100)
    losers = answers.users(coupon.id) - winners
    assert len(losers) == 4900
    await check_invariants(coupon, accepted=winners, rejected=losers)


async def test_overlapping_users_on_three_coupons_get_each_coupon_at_most_once(
    client, redis, pool, settings, make_coupon, check_invariants
):
    """Three drops at once (10, 20, unlimited) with overlapping crowds stay independent."""
    small = await make_coupon(total=10, title="small")
    medium = await make_coupon(total=20, title="medium")
    unlimited = await make_coupon(total=None, title="unlimited")
    drops = (small, medium, unlimited)
    rng = random.Random(7)
    clicks: list[tuple[int, int]] = []
    for user in range(1, 601):
        # Each user wants a random, non-empty subset of the coupons, so the crowds overlap.
        wanted = [c for c in drops if rng.random() < 0.6] or [rng.choice(drops)]
        for coupon in wanted:
            clicks.extend([(coupon.id, user)] * rng.randint(1, 3))
    rng.shuffle(clicks)

    answers = await _fire(client, clicks)
    await drain(redis, pool, settings)

    _assert_only_202_or_refusal(answers)
    _assert_one_202_per_user(answers)
    for coupon in drops:
        requesters = answers.users(coupon.id)
        # Far more requesters than stock, so the limited coupons sell out exactly.
        assert len(requesters) > 100
        expected = len(requesters) if coupon.total_quantity is None else coupon.total_quantity
        winners = await _assert_outcome(pool, coupon.id, answers, expected_winners=expected)
        await check_invariants(coupon, accepted=winners, rejected=requesters - winners)
    # The unlimited coupon refuses nothing but repeat clicks.
    unlimited_codes = {
        code
        for (coupon_id, _), got in answers.by_request.items()
        if coupon_id == unlimited.id
        for status, code in got
        if status != 202
    }
    assert unlimited_codes <= {"DUPLICATED_COUPON_ISSUE"}
