"""The audit log: every admin change is recorded with who made it, through what, and the values
before and after; the admin API (``GET /admin/audit``) and couponctl (``couponctl audit``) read
it back. Named admin tokens (``COUPON_ADMIN_TOKENS``) say who; the single token is "admin";
couponctl records its operator (``COUPON_OPERATOR``, else the login name).
"""

from __future__ import annotations

import getpass
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomysql
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway.app import create_app
from shared import keys
from shared.model import Coupon
from shared.mysql import coupon_rows
from shared.ops.cli.output import AUDIT_COLUMNS
from shared.settings import ConfigError, Settings, parse_admin_tokens
from tests.conftest import CouponFactory
from tests.helpers import ADMIN, assert_problem, couponctl, drain, issue
from tests.invariants import Checker

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def named_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
) -> TestClient[Any, Any]:
    """The gateway with two named admin tokens beside the single one."""
    named = settings.replace(admin_tokens=f"alice:{ALICE}, bob:{BOB}")
    return await aiohttp_client(create_app(named))


async def _audit(client: TestClient[Any, Any], query: str = "") -> dict[str, Any]:
    response = await client.get(f"/admin/audit{query}", headers=ADMIN)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def _body(**changes: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "title": "audited drop",
        "total_quantity": 10,
        "date_issue_start": (now - timedelta(minutes=1)).isoformat(),
        "date_issue_end": (now + timedelta(hours=1)).isoformat(),
        **changes,
    }


async def test_each_admin_change_is_recorded_with_its_actor_and_values(
    named_client: TestClient[Any, Any], redis: Redis, pool: aiomysql.Pool, settings: Settings,
    check_invariants: Checker,
) -> None:
    created = await named_client.post("/admin/coupons", json=_body(), headers=_bearer(ALICE))
    assert created.status == 201
    coupon_id = (await created.json())["id"]
    for token, change in (
        (BOB, {"paused": True}),
        (ALICE, {"paused": False}),
        (BOB, {"total_quantity": 25}),
        (ADMIN["Authorization"].split()[1], {"title": "renamed", "total_quantity": 20}),
    ):
        response = await named_client.patch(
            f"/admin/coupons/{coupon_id}", json=change, headers=_bearer(token)
        )
        assert response.status == 200, await response.text()

    page = await _audit(named_client, f"?coupon_id={coupon_id}")
    assert page["next_after"] is None
    entries = page["entries"]
    assert [(e["actor"], e["origin"], e["action"]) for e in entries] == [
        ("alice", "admin-api", "create"),
        ("bob", "admin-api", "pause"),
        ("alice", "admin-api", "resume"),
        ("bob", "admin-api", "top_up"),
        ("admin", "admin-api", "update"),
    ]
    assert all(e["coupon_id"] == coupon_id for e in entries)
    create = entries[0]
    assert create["before"] is None
    assert create["after"]["id"] == coupon_id
    assert create["after"]["total_quantity"] == 10
    assert create["after"]["title"] == "audited drop"
    assert entries[1]["before"] == {"paused": False}
    assert entries[1]["after"] == {"paused": True}
    assert entries[3]["before"] == {"total_quantity": 10}
    assert entries[3]["after"] == {"total_quantity": 25}
    assert entries[4]["before"] == {"title": "audited drop", "total_quantity": 25}
    assert entries[4]["after"] == {"title": "renamed", "total_quantity": 20}
    stamps = [datetime.fromisoformat(e["at"]) for e in entries]
    assert stamps == sorted(stamps)
    assert all(stamp.utcoffset() == timedelta(0) for stamp in stamps)

    status, _ = await issue(named_client, coupon_id, 7)
    assert status == 202
    await drain(redis, pool, settings)
    coupon = await _coupon(pool, coupon_id)
    await check_invariants(coupon, accepted={7}, rejected=set())


async def _coupon(pool: aiomysql.Pool, coupon_id: int) -> Coupon:
    coupon = await coupon_rows.fetch_coupon(pool, coupon_id)
    assert coupon is not None
    return coupon


async def test_a_refused_or_unauthenticated_change_leaves_no_record(
    named_client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis,
    pool: aiomysql.Pool, settings: Settings, check_invariants: Checker,
) -> None:
    coupon = await make_coupon(2)
    before = (await _audit(named_client))["entries"]
    assert [(e["actor"], e["action"]) for e in before] == [("tests", "create")]
    for user in (1, 2):
        assert (await issue(named_client, coupon.id, user))[0] == 202
    # Below the two accepted requests: refused inside Redis, so the MySQL transaction (and
    # the record written in it) is rolled back.
    refused = await named_client.patch(
        f"/admin/coupons/{coupon.id}", json={"total_quantity": 1}, headers=_bearer(ALICE)
    )
    await assert_problem(refused, 409, "CONFLICT")
    wrong = await named_client.patch(
        f"/admin/coupons/{coupon.id}", json={"paused": True}, headers=_bearer("x" * 30)
    )
    await assert_problem(wrong, 401, "UNAUTHORIZED")
    assert (await _audit(named_client))["entries"] == before
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1, 2}, rejected=set())


async def test_the_log_pages_in_order_and_filters_by_coupon(
    client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    first, second = await make_coupon(5), await make_coupon(5)
    for number in range(3):
        response = await client.patch(
            f"/admin/coupons/{first.id}", json={"title": f"t{number}"}, headers=ADMIN
        )
        assert response.status == 200
    one = await _audit(client, f"?coupon_id={second.id}")
    assert [e["action"] for e in one["entries"]] == ["create"]
    seen: list[dict[str, Any]] = []
    after = 0
    for _ in range(10):  # 5 entries, 2 a page: 3 pages
        page = await _audit(client, f"?after={after}&limit=2")
        seen += page["entries"]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)
    assert [(e["coupon_id"], e["action"]) for e in seen] == [
        (first.id, "create"), (second.id, "create"),
        (first.id, "update"), (first.id, "update"), (first.id, "update"),
    ]  # fmt: skip
    for query in ("?limit=0", "?limit=1001", "?after=-1", "?coupon_id=0"):
        response = await client.get(f"/admin/audit{query}", headers=ADMIN)
        await assert_problem(response, 400, "INVALID_REQUEST")


async def test_couponctl_records_its_operator_for_every_kind_of_change(
    client: TestClient[Any, Any], settings: Settings, redis: Redis, pool: aiomysql.Pool,
    check_invariants: Checker,
) -> None:
    carol = {"COUPON_OPERATOR": "carol"}
    start = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    code, out, err = await couponctl(
        settings, "--json", "coupon", "create", "--title", "cli drop", "--total", "5",
        "--start", start, env=carol,
    )  # fmt: skip
    assert code == 0, err
    coupon_id = orjson.loads(out)["id"]
    for args in (("coupon", "pause", str(coupon_id)), ("coupon", "resume", str(coupon_id))):
        code, _, err = await couponctl(settings, *args, env=carol)
        assert code == 0, err
    # Without COUPON_OPERATOR, the login name running it.
    code, _, err = await couponctl(settings, "coupon", "update", str(coupon_id), "--total", "9")
    assert code == 0, err

    # A dead letter released by hand, then replayed; a drift repaired; a rebuild.
    status, accepted = await issue(client, coupon_id, 3)
    assert status == 202
    k = keys.CouponKeys(coupon_id)
    await redis.xreadgroup(keys.GROUP, "stuck-consumer", {k.requests: ">"}, count=10)
    code, out, err = await couponctl(
        settings, "--json", "dead", "release", str(coupon_id), accepted["request_id"], env=carol
    )
    assert code == 0, err
    assert orjson.loads(out)["result"] == "dead_lettered"
    code, out, err = await couponctl(
        settings, "--json", "dead", "replay", str(coupon_id), env=carol
    )
    assert code == 0, err
    assert [r["result"] for r in orjson.loads(out)] == ["queued"]
    await drain(redis, pool, settings)
    await redis.sadd(k.users, 999)  # an orphan slot: no request, no row
    code, _, err = await couponctl(settings, "reconcile", str(coupon_id), "--repair", env=carol)
    assert code == 0, err
    code, _, err = await couponctl(settings, "rebuild", str(coupon_id), env=carol)
    assert code == 0, err

    code, out, err = await couponctl(settings, "audit", "--coupon", str(coupon_id), "--json")
    assert code == 0, err
    entries = orjson.loads(out)
    login = getpass.getuser()
    assert [(e["actor"], e["origin"], e["action"]) for e in entries] == [
        ("carol", "couponctl", "create"),
        ("carol", "couponctl", "pause"),
        ("carol", "couponctl", "resume"),
        (login, "couponctl", "top_up"),
        ("carol", "couponctl", "dead_release"),
        ("carol", "couponctl", "dead_replay"),
        ("carol", "couponctl", "reconcile_repair"),
        ("carol", "couponctl", "rebuild"),
    ]
    assert entries[3]["before"] == {"total_quantity": 5}
    assert entries[4]["after"]["entry_id"] == accepted["request_id"]
    assert entries[5]["after"]["count"] == 1
    assert entries[6]["after"] == {"orphan_slot": {"count": 1, "items": ["999"]}}
    assert entries[7]["after"]["issued"] == 1

    code, out, err = await couponctl(settings, "audit", "--coupon", str(coupon_id))
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split() == list(AUDIT_COLUMNS)
    assert len(lines) == len(entries)
    assert '{"paused":true}' in lines[1]

    coupon = await _coupon(pool, coupon_id)
    await check_invariants(coupon, accepted={3}, rejected=set())


def test_named_tokens_are_checked_at_start() -> None:
    assert parse_admin_tokens("alice:" + "a" * 16 + ", bob:" + "b" * 20) == {
        "a" * 16: "alice",
        "b" * 20: "bob",
    }
    assert parse_admin_tokens("") == {}
    for bad in (
        "alice",  # no token
        "alice:short",  # too short
        ":" + "a" * 16,  # no name
        "al ice:" + "a" * 16,  # a space in the name
        "alice:" + "a" * 16 + ",alice:" + "b" * 16,  # a name twice
        "alice:" + "a" * 16 + ",bob:" + "a" * 16,  # a token twice
    ):
        with pytest.raises(ConfigError, match="COUPON_ADMIN_TOKENS"):
            parse_admin_tokens(bad)
    with pytest.raises(ConfigError, match="COUPON_ADMIN_TOKENS"):
        Settings(admin_tokens="alice:x")
    with pytest.raises(ConfigError, match="also one of"):
        Settings(admin_token="a" * 16, admin_tokens="alice:" + "a" * 16)
    with pytest.raises(ConfigError, match="COUPON_OPERATOR"):
        Settings(operator="carol smith")
    settings = Settings(admin_token="s" * 16, admin_tokens="alice:" + "a" * 16)
    assert settings.admin_actors == {"a" * 16: "alice", "s" * 16: "admin"}
    assert "a" * 16 not in repr(settings)
