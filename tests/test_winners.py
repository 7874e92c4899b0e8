"""Getting the winners out without SQL: ``GET /admin/coupons/{id}/winners`` (CSV or JSON lines,
streamed from MySQL a page at a time) and ``couponctl coupon winners``."""

from __future__ import annotations

import csv
import io
from typing import Any

import aiomysql
import orjson
import pytest
from redis.asyncio import Redis

from shared.settings import Settings
from tests.conftest import CouponFactory
from tests.helpers import ADMIN, assert_problem, couponctl, drain, issue
from tests.invariants import Checker

MANY = 100_000


async def _many_winners(pool: aiomysql.Pool, coupon_id: int, count: int) -> None:
    """``count`` rows written straight into MySQL (MariaDB's sequence engine numbers them), as
    a drop of that size would leave them: the export reads MySQL only."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO coupon_issues (coupon_id, user_id, request_id, date_issued)"
            f" SELECT %s, seq, CONCAT('1700000000000-', seq), NOW(6) FROM seq_1_to_{count}",
            (coupon_id,),
        )
        await cur.execute(
            "UPDATE coupons SET issued_quantity = %s WHERE id = %s", (count, coupon_id)
        )
        await conn.commit()


@pytest.fixture
async def crowded(pool: aiomysql.Pool, make_coupon: CouponFactory) -> int:
    coupon = await make_coupon(total=MANY, title="big drop")
    await _many_winners(pool, coupon.id, MANY)
    return coupon.id


async def test_100000_winners_stream_as_csv(client: Any, crowded: int) -> None:
    response = await client.get(
        f"/admin/coupons/{crowded}/winners", headers={**ADMIN, "Accept": "text/csv"}
    )
    assert response.status == 200
    assert response.content_type == "text/csv"
    assert response.headers["Transfer-Encoding"] == "chunked"  # streamed, not one body
    assert "winners.csv" in response.headers["Content-Disposition"]
    chunks = 0
    body = bytearray()
    async for chunk in response.content.iter_any():
        chunks += 1
        body += chunk
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0] == ["user_id", "request_id", "date_issued", "date_created"]
    assert len(rows) == MANY + 1
    assert {int(row[0]) for row in rows[1:]} == set(range(1, MANY + 1))
    assert rows[1][1] == "1700000000000-1"
    assert chunks > 1


async def test_couponctl_writes_the_same_winners(settings: Settings, crowded: int) -> None:
    code, out, err = await couponctl(settings, "coupon", "winners", str(crowded), "--csv")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "user_id,request_id,date_issued,date_created"
    assert len(lines) == MANY + 1
    code, out, err = await couponctl(settings, "coupon", "winners", str(crowded), "--jsonl")
    assert code == 0, err
    first = orjson.loads(out.splitlines()[0])
    assert first["user_id"] == 1
    assert len(out.splitlines()) == MANY


async def test_a_client_that_leaves_mid_export_leaves_the_service_working(
    client: Any, crowded: int
) -> None:
    response = await client.get(f"/admin/coupons/{crowded}/winners", headers=ADMIN)
    assert response.status == 200
    await response.content.readany()
    response.close()  # gone before the rest
    for _ in range(3):  # the pool's connections still answer (none is left mid-result)
        again = await client.get(f"/admin/coupons/{crowded}", headers=ADMIN)
        assert again.status == 200
        assert (await again.json())["issued"] == MANY


async def test_winners_of_a_drop_as_json_lines(
    client: Any,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=2)
    accepted = {}
    for user in (11, 12, 13):
        status, body = await issue(client, coupon.id, user)
        if status == 202:
            accepted[user] = body["request_id"]
    assert len(accepted) == 2
    await drain(redis, pool, settings)
    response = await client.get(f"/admin/coupons/{coupon.id}/winners", headers=ADMIN)
    assert response.status == 200
    assert response.content_type == "application/x-ndjson"
    lines = [orjson.loads(line) for line in (await response.read()).splitlines()]
    assert {line["user_id"]: line["request_id"] for line in lines} == accepted
    assert all(line["date_issued"].endswith("+00:00") for line in lines)
    await check_invariants(coupon, accepted=set(accepted), rejected={13})


async def test_winners_of_an_unknown_coupon_is_a_404(client: Any) -> None:
    response = await client.get("/admin/coupons/424242/winners", headers=ADMIN)
    await assert_problem(response, 404, "COUPON_NOT_EXIST")
