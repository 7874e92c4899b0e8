"""The seed-compatible routes: byte-for-byte shapes and messages, the synchronous path, and the
mix of synchronous and asynchronous issuance on one coupon."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from shared import keys
from tests.helpers import drain, row_count

SEED_ROUTES = ["/v1/issue", "/v1/issue-async", "/v2/issue-async"]
ASYNC_ROUTES = ["/v1/issue-async", "/v2/issue-async"]

# The seed's ErrorCode messages, returned verbatim as "comment".
DUPLICATED = "이미 발급된 쿠폰입니다."
QUANTITY = "쿠폰 발급 수량이 유효하지 않습니다."
DATE = "쿠폰 발급 기간이 유효하지 않습니다."
NOT_EXIST = "존재하지 않는 쿠폰입니다."


async def seed_issue(
    client: TestClient[Any, Any], route: str, coupon_id: int, user_id: int
) -> tuple[int, bytes]:
    response = await client.post(route, json={"userId": user_id, "couponId": coupon_id})
    return response.status, await response.read()


def refusal(comment: str) -> bytes:
    return ('{"isSuccess":false,"comment":"' + comment + '"}').encode()


SUCCESS = b'{"isSuccess":true}'


@pytest.mark.parametrize("route", SEED_ROUTES)
async def test_seed_route_answers_in_the_seeds_shapes(
    route, client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=2)
    assert await seed_issue(client, route, coupon.id, 1) == (200, SUCCESS)
    assert await seed_issue(client, route, coupon.id, 1) == (200, refusal(DUPLICATED))
    assert await seed_issue(client, route, coupon.id, 2) == (200, SUCCESS)
    # Once sold out, every request gets the quantity message (a winner's repeat included:
    # the gateway answers from its sold-out flag without asking Redis who holds a slot).
    assert await seed_issue(client, route, coupon.id, 3) == (200, refusal(QUANTITY))
    assert await seed_issue(client, route, coupon.id + 1000, 4) == (200, refusal(NOT_EXIST))
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1, 2}, rejected={3})


@pytest.mark.parametrize("route", SEED_ROUTES)
async def test_seed_route_outside_the_window_is_the_date_message(
    route, client, redis, pool, settings, make_coupon, check_invariants
):
    now = datetime.now(UTC)
    later = await make_coupon(start=now + timedelta(hours=1), end=now + timedelta(hours=2))
    over = await make_coupon(start=now - timedelta(hours=2), end=now - timedelta(hours=1))
    assert await seed_issue(client, route, later.id, 1) == (200, refusal(DATE))
    assert await seed_issue(client, route, over.id, 1) == (200, refusal(DATE))
    await drain(redis, pool, settings)
    await check_invariants(later, rejected={1})
    await check_invariants(over, rejected={1})


@pytest.mark.parametrize("route", SEED_ROUTES)
@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"userId": 1}',
        b'{"couponId": 1}',
        b'{"userId": "1", "couponId": 1}',
        b'{"userId": 1, "couponId": 0}',
        b'{"userId": 1.5, "couponId": 1}',
        b'{"userId": true, "couponId": 1}',
        b'{"userId": 9223372036854775808, "couponId": 1}',
    ],
)
async def test_seed_route_malformed_body_is_400_and_writes_nothing(
    route, body, client, redis, make_coupon
):
    coupon = await make_coupon(total=5)
    before = sorted(await redis.keys("*"))
    response = await client.post(route, data=body)
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert (await response.json(content_type=None))["code"] == "INVALID_REQUEST"
    assert sorted(await redis.keys("*")) == before
    assert await redis.xlen(keys.CouponKeys(coupon.id).requests) == 0


async def test_sync_issue_commits_the_row_before_answering(client, pool, redis, make_coupon):
    coupon = await make_coupon(total=3)
    assert await seed_issue(client, "/v1/issue", coupon.id, 11) == (200, SUCCESS)
    # No worker has run: the gateway itself committed the row.
    assert await row_count(pool, coupon.id) == 1
    status = await client.get(f"/v1/coupons/{coupon.id}/issues/11")
    assert (await status.json())["status"] == "issued"


async def test_sync_issue_entry_is_acked_by_the_worker_without_a_second_row(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=3)
    for user in (1, 2, 3):
        assert await seed_issue(client, "/v1/issue", coupon.id, user) == (200, SUCCESS)
    await drain(redis, pool, settings)
    snapshot = await check_invariants(coupon, accepted={1, 2, 3})
    assert snapshot.issued_quantity == 3


async def test_mixing_sync_and_async_on_one_coupon_never_oversells_or_doubles(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=40)
    rng = random.Random(7)
    # 200 users, each clicking 1-3 times on random seed routes, all at once.
    clicks = [
        (user, rng.choice(SEED_ROUTES)) for user in range(1, 201) for _ in range(rng.randint(1, 3))
    ]
    rng.shuffle(clicks)
    gate = asyncio.Semaphore(100)

    async def click(user: int, route: str) -> tuple[int, int, bytes]:
        async with gate:
            status, body = await seed_issue(client, route, coupon.id, user)
        return user, status, body

    answers = await asyncio.gather(*(click(user, route) for user, route in clicks))
    assert {status for _, status, _ in answers} == {200}
    winners = [user for user, _, body in answers if body == SUCCESS]
    assert len(winners) == len(set(winners)) == 40
    refused = {user for user, _, body in answers if body != SUCCESS} - set(winners)
    assert {body for _, _, body in answers} <= {SUCCESS, refusal(DUPLICATED), refusal(QUANTITY)}
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted=winners, rejected=refused)


@pytest.mark.parametrize("route", ASYNC_ROUTES)
async def test_seed_style_load_issues_exactly_as_many_rows_as_true_answers(
    route, client, redis, pool, settings, make_coupon, check_invariants
):
    """The seed's locust load: random userIds 1..10,000,000, no think time."""
    coupon = await make_coupon(total=150)
    rng = random.Random(route)
    users = [rng.randint(1, 10_000_000) for _ in range(600)]
    gate = asyncio.Semaphore(200)

    async def click(user: int) -> tuple[int, bytes]:
        async with gate:
            return user, (await seed_issue(client, route, coupon.id, user))[1]

    answers = await asyncio.gather(*(click(user) for user in users))
    winners = {user for user, body in answers if body == SUCCESS}
    successes = sum(1 for _, body in answers if body == SUCCESS)
    await drain(redis, pool, settings)
    assert await row_count(pool, coupon.id) == successes == len(winners) == 150
    await check_invariants(coupon, accepted=winners, rejected=set(users) - winners)


async def test_hello_is_the_seeds_baseline(client):
    response = await client.get("/hello")
    assert response.status == 200
    assert await response.text() == "hello!"
