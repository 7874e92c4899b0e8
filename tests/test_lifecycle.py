"""Live coupon changes through the admin API: top-ups, pauses, moved windows, listing, and the
push invalidation that makes every gateway obey a change without waiting for a TTL."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from shared import keys
from tests.helpers import ADMIN, drain, issue, wait_for

# Far longer than any wait below: a change seen in time was pushed, not expired.
LONG_TTL = 3600.0


@pytest.fixture
async def gateways(aiohttp_client, settings, redis, pool) -> list[TestClient[Any, Any]]:
    """Two independent gateway apps (two processes' worth of caches) with a long snapshot TTL."""
    slow = settings.replace(snapshot_ttl_seconds=LONG_TTL)
    return [await aiohttp_client(create_app(slow)) for _ in range(2)]


async def patch(client: TestClient[Any, Any], coupon_id: int, body: Any) -> tuple[int, Any]:
    response = await client.patch(f"/admin/coupons/{coupon_id}", json=body, headers=ADMIN)
    return response.status, await response.json(content_type=None)


async def statuses(client: TestClient[Any, Any], coupon_id: int, users: range) -> dict[int, int]:
    answers = await asyncio.gather(*(issue(client, coupon_id, user) for user in users))
    return {user: status for user, (status, _) in zip(users, answers, strict=True)}


async def test_top_up_of_a_sold_out_coupon_sells_again_at_once(
    gateways, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=2)
    first, second = gateways
    assert set((await statuses(first, coupon.id, range(1, 4))).values()) == {202, 409}
    # Both gateways now hold the coupon as sold out.
    assert (await issue(second, coupon.id, 4))[0] == 409
    status, body = await patch(first, coupon.id, {"total_quantity": 3})
    assert (status, body["total_quantity"]) == (200, 3)

    async def sells_again() -> bool:
        return (await issue(second, coupon.id, 5))[0] == 202

    await wait_for(sells_again, within=5.0)
    await drain(redis, pool, settings)
    topped_up = dataclasses.replace(coupon, total_quantity=3)
    snapshot = await check_invariants(topped_up)
    assert len(snapshot.rows) == 3


async def test_top_up_during_load_issues_exactly_the_new_total(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=100)
    accepted: set[int] = set()
    refused: set[int] = set()

    async def wave(users: range) -> None:
        for user, status in (await statuses(client, coupon.id, users)).items():
            assert status in (202, 409), status
            (accepted if status == 202 else refused).add(user)

    load = asyncio.gather(*(wave(range(start, start + 50)) for start in range(1, 401, 50)))
    status, _ = await patch(client, coupon.id, {"total_quantity": 150})
    assert status == 200
    await load
    await wave(range(1000, 1200))  # after the top-up: whatever stock is left sells
    await drain(redis, pool, settings)
    topped_up = dataclasses.replace(coupon, total_quantity=150)
    snapshot = await check_invariants(topped_up, accepted=accepted, rejected=refused - accepted)
    assert len(snapshot.rows) == len(accepted) == 150


async def test_pause_and_resume_during_load(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=1000)
    assert set((await statuses(client, coupon.id, range(1, 51))).values()) == {202}
    assert (await patch(client, coupon.id, {"paused": True}))[0] == 200
    status, body = await issue(client, coupon.id, 51)
    assert (status, body["code"]) == (409, "COUPON_PAUSED")
    assert set((await statuses(client, coupon.id, range(52, 100))).values()) == {409}
    assert (await patch(client, coupon.id, {"paused": False}))[0] == 200
    assert set((await statuses(client, coupon.id, range(100, 150))).values()) == {202}
    await drain(redis, pool, settings)
    accepted = set(range(1, 51)) | set(range(100, 150))
    await check_invariants(coupon, accepted=accepted, rejected=set(range(51, 100)))


async def test_moved_window_is_obeyed_by_every_gateway_holding_a_snapshot(
    gateways, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=100)
    for gateway in gateways:  # both cache the open window
        assert (await issue(gateway, coupon.id, gateways.index(gateway) + 1))[0] == 202
    now = datetime.now(UTC)
    closed = {
        "date_issue_start": (now - timedelta(hours=2)).isoformat(),
        "date_issue_end": (now - timedelta(hours=1)).isoformat(),
    }
    assert (await patch(gateways[0], coupon.id, closed))[0] == 200
    user = iter(range(100, 10_000))
    for gateway in gateways:

        async def refuses(gateway: TestClient[Any, Any] = gateway) -> bool:
            status, body = await issue(gateway, coupon.id, next(user))
            assert status in (202, 409), body
            return body.get("code") == "INVALID_COUPON_ISSUE_DATE"

        await wait_for(refuses, within=5.0)
    await drain(redis, pool, settings)
    rows = (await check_invariants(coupon)).rows
    # Requests that slipped in before the change arrived were accepted and issued, no others.
    assert {1, 2} <= set(rows)


async def test_lowering_the_total_below_what_was_promised_is_refused(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=10)
    assert set((await statuses(client, coupon.id, range(1, 6))).values()) == {202}
    status, body = await patch(client, coupon.id, {"total_quantity": 4})
    assert (status, body["code"]) == (409, "CONFLICT")
    await drain(redis, pool, settings)
    status, body = await patch(client, coupon.id, {"total_quantity": 3})
    assert (status, body["code"]) == (409, "CONFLICT")
    # Exactly the promised amount is fine: the coupon is then sold out.
    assert (await patch(client, coupon.id, {"total_quantity": 5}))[0] == 200
    status, body = await issue(client, coupon.id, 6)
    assert (status, body["code"]) == (409, "INVALID_COUPON_ISSUE_QUANTITY")
    lowered = dataclasses.replace(coupon, total_quantity=5)
    await check_invariants(lowered, accepted=range(1, 6), rejected={6})


@pytest.mark.parametrize(
    "body",
    [
        {},
        [],
        {"total_quantity": -1},
        {"total_quantity": "10"},
        {"paused": "yes"},
        {"date_issue_end": "yesterday"},
        {"date_issue_start": "2030-01-01T00:00:00"},
        {"date_issue_start": "2099-01-01T00:00:00+00:00"},
        {"id": 5},
        {"issued_quantity": 0},
    ],
)
async def test_bad_change_is_400_and_changes_nothing(body, client, redis, pool, make_coupon):
    coupon = await make_coupon(total=10)
    meta = await redis.hgetall(keys.CouponKeys(coupon.id).meta)
    status, problem = await patch(client, coupon.id, body)
    assert (status, problem["code"]) == (400, "INVALID_REQUEST"), problem
    assert await redis.hgetall(keys.CouponKeys(coupon.id).meta) == meta
    response = await client.get(f"/admin/coupons/{coupon.id}", headers=ADMIN)
    assert (await response.json())["total_quantity"] == 10


async def test_change_needs_the_admin_token_and_an_existing_coupon(client, make_coupon):
    coupon = await make_coupon(total=10)
    response = await client.patch(f"/admin/coupons/{coupon.id}", json={"paused": True})
    assert response.status == 401
    assert (await patch(client, coupon.id + 1000, {"paused": True}))[0] == 404
    assert (await issue(client, coupon.id, 1))[0] == 202


async def test_list_pages_through_every_coupon(client, make_coupon):
    made = [(await make_coupon(total=n, title=f"drop {n}")).id for n in range(1, 6)]
    seen: list[int] = []
    after = 0
    for _ in range(10):  # bounded: 5 coupons in pages of 2 take 3 pages
        response = await client.get(f"/admin/coupons?limit=2&after={after}", headers=ADMIN)
        page = await response.json()
        seen += [coupon["id"] for coupon in page["coupons"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert seen == made
    assert (await client.get("/admin/coupons?limit=0", headers=ADMIN)).status == 400
    assert (await client.get("/admin/coupons")).status == 401


async def test_unknown_coupon_ids_are_negatively_cached(client, redis):
    await redis.config_resetstat()
    answers = await asyncio.gather(*(issue(client, 424242, user) for user in range(1, 201)))
    assert {status for status, _ in answers} == {404}
    stats = await redis.info("commandstats")
    # One snapshot load for 200 requests (single-flight, then the negative entry).
    assert stats.get("cmdstat_hgetall", {}).get("calls", 0) <= 1
    assert "cmdstat_evalsha" not in stats
