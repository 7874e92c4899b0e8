"""A retried coupon creation (a timeout, a double click) makes one coupon, not two.

``POST /admin/coupons`` with an ``Idempotency-Key``: the same key and the same request answer the
first coupon again; the same key with another request is a 422; the key is kept for a day and
goes with its coupon. couponctl sends a key on every create and takes one to repeat a create.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiomysql
import orjson
from redis.asyncio import Redis

from shared import keys
from shared.mysql import coupon_rows
from shared.settings import Settings
from tests.helpers import ADMIN, assert_problem, couponctl, drain, issue
from tests.invariants import Checker

START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "title": "weekly drop",
        "total_quantity": 100,
        "date_issue_start": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        "date_issue_end": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }
    body.update(changes)
    return body


async def _create(client: Any, body: dict[str, Any], key: str | None) -> Any:
    headers = {**ADMIN, **({} if key is None else {"Idempotency-Key": key})}
    return await client.post("/admin/coupons", json=body, headers=headers)


async def _coupon_rows(pool: aiomysql.Pool) -> int:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM coupons")
        (count,) = await cur.fetchone()
        await conn.rollback()
    return int(count)


async def test_same_key_and_body_answer_the_first_coupon_and_make_no_second(
    client: Any, pool: aiomysql.Pool, redis: Redis, settings: Settings, check_invariants: Checker
) -> None:
    body = _body()
    first = await _create(client, body, "drop-2030-01")
    assert first.status == 201
    created = await first.json()
    assert "Idempotent-Replayed" not in first.headers
    # The same instant written in another zone, and a default given explicitly: the same request.
    tokyo = timezone(timedelta(hours=9))
    start = datetime.fromisoformat(body["date_issue_start"]).astimezone(tokyo)
    again = await _create(
        client, {**body, "date_issue_start": start.isoformat(), "discount_amount": 0},
        "drop-2030-01",
    )  # fmt: skip
    assert again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == created
    assert await _coupon_rows(pool) == 1
    assert await redis.smembers(keys.ACTIVE_COUPONS) == {str(created["id"])}
    # The one coupon issues as any other.
    assert (await issue(client, created["id"], 7))[0] == 202
    await drain(redis, pool, settings)
    coupon = await coupon_rows.fetch_coupon(pool, created["id"])
    assert coupon is not None
    await check_invariants(coupon, accepted={7})


async def test_same_key_with_another_body_is_a_422_and_changes_nothing(
    client: Any, pool: aiomysql.Pool
) -> None:
    assert (await _create(client, _body(), "k-1")).status == 201
    response = await _create(client, _body(total_quantity=200), "k-1")
    problem = await assert_problem(response, 422, "IDEMPOTENCY_KEY_REUSED")
    assert "k-1" in problem["detail"]
    assert await _coupon_rows(pool) == 1


async def test_a_double_click_makes_one_coupon(client: Any, pool: aiomysql.Pool) -> None:
    """Ten creations with one key at once: one coupon. A request that finds the first one still
    running is told to retry (503), and its retry answers the coupon."""
    body = _body()
    answers = await asyncio.gather(*(_create(client, body, "double-click") for _ in range(10)))
    statuses = sorted(answer.status for answer in answers)
    assert set(statuses) <= {201, 503}, statuses
    ids = {(await answer.json())["id"] for answer in answers if answer.status == 201}
    for answer in answers:
        if answer.status == 503:
            retry = await _create(client, body, "double-click")
            assert retry.status == 201
            ids.add((await retry.json())["id"])
    assert len(ids) == 1
    assert await _coupon_rows(pool) == 1


async def test_without_a_key_each_creation_makes_a_coupon(client: Any, pool: aiomysql.Pool) -> None:
    body = _body()
    assert (await _create(client, body, None)).status == 201
    assert (await _create(client, body, None)).status == 201
    assert await _coupon_rows(pool) == 2


async def test_malformed_keys_are_400_and_create_nothing(client: Any, pool: aiomysql.Pool) -> None:
    for key in ("", "x" * 256, "two words", "kéy"):
        response = await client.post(
            "/admin/coupons",
            data=orjson.dumps(_body()),
            headers={**ADMIN, "Content-Type": "application/json", "Idempotency-Key": key},
        )
        await assert_problem(response, 400, "INVALID_REQUEST")
    assert await _coupon_rows(pool) == 0


async def test_a_key_is_forgotten_after_a_day_and_with_its_coupon(
    client: Any, pool: aiomysql.Pool
) -> None:
    body = _body()
    first = await (await _create(client, body, "old-key")).json()
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "UPDATE coupon_create_keys SET date_created = NOW(6) - INTERVAL 25 HOUR"
            " WHERE idempotency_key = 'old-key'"
        )
        await conn.commit()
    second = await (await _create(client, body, "old-key")).json()
    assert second["id"] != first["id"]
    # A coupon deleted from MySQL takes its key along: the key makes a coupon again.
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("DELETE FROM coupons WHERE id = %s", (second["id"],))
        await conn.commit()
    third = await _create(client, body, "old-key")
    assert third.status == 201
    assert "Idempotent-Replayed" not in third.headers


async def test_couponctl_repeats_a_create_safely_with_its_key(
    settings: Settings, pool: aiomysql.Pool, redis: Redis
) -> None:
    args = ["--json", "coupon", "create", "--title", "cli drop", "--total", "5"]
    keyed = [*args, "--start", START.isoformat(), "--idempotency-key", "cli-2030"]
    code, out, err = await couponctl(settings, *keyed)
    assert code == 0, err
    again_code, again_out, again_err = await couponctl(settings, *keyed)
    assert again_code == 0, again_err
    assert orjson.loads(again_out) == orjson.loads(out)
    # Without a key every run is a new coupon (each gets a fresh key).
    for _ in range(2):
        code, _, err = await couponctl(settings, *args)
        assert code == 0, err
    assert await _coupon_rows(pool) == 3
    # A key without --start would be another request on every run ("now" moves): refused.
    code, _, err = await couponctl(settings, *args, "--idempotency-key", "cli-now")
    assert code != 0
    assert "--start" in err
    coupon_id = orjson.loads(out)["id"]
    assert str(coupon_id) in await redis.smembers(keys.ACTIVE_COUPONS)
