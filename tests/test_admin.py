"""The admin routes, the ``couponctl`` command line and the configuration.

Covers authentication of ``/admin/*`` (401 problem+json, nothing created), coupon creation over
HTTP (201 and ready to issue at once; malformed bodies are 400 and create nothing in MySQL or
Redis), the admin counters before and after the worker drains, ``couponctl`` run as a real
subprocess (migrate, create, show, and one-line errors without tracebacks), and
``Settings.from_env`` rejecting bad values with the variable's name.
"""

from __future__ import annotations

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
from shared.redis.scripts import Scripts
from shared.settings import ConfigError, Settings
from tests.conftest import ADMIN_TOKEN, CouponFactory
from tests.helpers import ADMIN, assert_problem, couponctl, drain, issue
from tests.invariants import Checker

Client = TestClient[Any, Any]


# --------------------------------------------------------------------------------------------
# helpers


def coupon_body(**changes: Any) -> dict[str, Any]:
    """A valid admin creation body, with some fields changed (None removes a field)."""
    now = datetime.now(UTC)
    body: dict[str, Any] = {
        "title": "admin drop",
        "total_quantity": 3,
        "discount_amount": 500,
        "min_available_amount": 5000,
        "date_issue_start": (now - timedelta(minutes=1)).isoformat(),
        "date_issue_end": (now + timedelta(hours=1)).isoformat(),
    }
    for field, value in changes.items():
        if value is None:
            body.pop(field, None)
        else:
            body[field] = value
    return body


async def coupon_row_count(pool: aiomysql.Pool) -> int:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM coupons")
        (count,) = await cur.fetchone()
        await conn.rollback()
    return int(count)


async def assert_no_coupon_created(pool: aiomysql.Pool, redis: Redis) -> None:
    assert await coupon_row_count(pool) == 0
    # Only the marker a fresh system gets at gateway start (shared/redis_state.py).
    assert set(await redis.keys("*")) <= {keys.STATE_MARKER}


async def admin_counters(client: Client, coupon_id: int) -> dict[str, Any]:
    response = await client.get(f"/admin/coupons/{coupon_id}", headers=ADMIN)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def counters_of(body: dict[str, Any]) -> dict[str, Any]:
    names = ("requested", "issued", "pending", "dead_lettered", "remaining")
    return {name: body[name] for name in names}


# --------------------------------------------------------------------------------------------
# 1. POST /admin/coupons


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": ADMIN_TOKEN},
    ],
    ids=["none", "wrong", "basic_scheme", "empty", "token_plus_one", "no_scheme"],
)
async def test_create_without_valid_token_is_401_and_creates_nothing(
    client: Client, redis: Redis, pool: aiomysql.Pool, headers: dict[str, str]
) -> None:
    response = await client.post("/admin/coupons", json=coupon_body(), headers=headers)
    await assert_problem(response, 401, "UNAUTHORIZED")
    await assert_no_coupon_created(pool, redis)


async def test_admin_refuses_everything_when_no_token_is_configured(
    aiohttp_client: Any, settings: Settings, redis: Redis, pool: aiomysql.Pool
) -> None:
    client: Client = await aiohttp_client(create_app(settings.replace(admin_token=None)))
    response = await client.post("/admin/coupons", json=coupon_body(), headers=ADMIN)
    await assert_problem(response, 401, "UNAUTHORIZED")
    await assert_problem(await client.get("/admin/coupons/1", headers=ADMIN), 401)
    await assert_no_coupon_created(pool, redis)


async def test_create_with_token_is_201_and_ready_to_issue(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    check_invariants: Checker,
) -> None:
    body = coupon_body(title="  launch  ", total_quantity=2)
    response = await client.post("/admin/coupons", json=body, headers=ADMIN)
    assert response.status == 201, await response.text()
    created = await response.json()
    assert isinstance(created["id"], int)
    assert created["title"] == "launch"
    assert created["total_quantity"] == 2
    assert created["discount_amount"] == 500
    assert created["min_available_amount"] == 5000
    assert created["coupon_type"] == "FIRST_COME_FIRST_SERVED"
    # The wire form has millisecond precision.
    for field in ("date_issue_start", "date_issue_end"):
        shift = datetime.fromisoformat(created[field]) - datetime.fromisoformat(body[field])
        assert abs(shift) < timedelta(milliseconds=1), field

    # The MySQL row and the Redis state both exist.
    coupon = await coupon_rows.fetch_coupon(pool, created["id"])
    assert coupon is not None
    assert coupon.title == "launch"
    assert await redis.exists(keys.CouponKeys(coupon.id).meta)
    assert await redis.sismember(keys.ACTIVE_COUPONS, str(coupon.id))

    # No warm-up: the very next request is judged against the new state.
    status, accepted = await issue(client, coupon.id, 1)
    assert status == 202, accepted
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1})


async def test_unlimited_coupon_can_be_created(client: Client, pool: aiomysql.Pool) -> None:
    response = await client.post(
        "/admin/coupons", json=coupon_body(total_quantity=None), headers=ADMIN
    )
    assert response.status == 201
    created = await response.json()
    assert created["total_quantity"] is None
    coupon = await coupon_rows.fetch_coupon(pool, created["id"])
    assert coupon is not None
    assert coupon.total_quantity is None


def _iso(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


BAD_CREATE_BODIES: list[tuple[str, Any]] = [
    ("missing_title", coupon_body(title=None)),
    ("blank_title", coupon_body(title="   ")),
    ("title_not_string", coupon_body(title=5)),
    ("title_too_long", coupon_body(title="t" * 256)),
    ("negative_total", coupon_body(total_quantity=-1)),
    ("total_as_string", coupon_body(total_quantity="5")),
    ("total_as_float", coupon_body(total_quantity=2.5)),
    ("total_as_bool", coupon_body(total_quantity=True)),
    ("total_over_int32", coupon_body(total_quantity=2**31)),
    ("negative_discount", coupon_body(discount_amount=-1)),
    ("discount_as_string", coupon_body(discount_amount="100")),
    (
        "end_before_start",
        coupon_body(date_issue_start=_iso(timedelta(hours=2)), date_issue_end=_iso(timedelta())),
    ),
    (
        "end_equals_start",
        coupon_body(
            date_issue_start="2030-01-01T00:00:00+00:00",
            date_issue_end="2030-01-01T09:00:00+09:00",
        ),
    ),
    ("unparsable_start", coupon_body(date_issue_start="tomorrow")),
    ("unparsable_end", coupon_body(date_issue_end="2030-13-45T00:00:00+00:00")),
    ("start_without_offset", coupon_body(date_issue_start="2020-01-01T00:00:00")),
    ("start_as_number", coupon_body(date_issue_start=1_700_000_000)),
    ("missing_end", coupon_body(date_issue_end=None)),
    ("json_array", [coupon_body()]),
    ("json_string", "coupon"),
]


@pytest.mark.parametrize(
    ("case", "body"), BAD_CREATE_BODIES, ids=[case for case, _ in BAD_CREATE_BODIES]
)
async def test_create_with_bad_body_is_400_and_creates_nothing(
    client: Client, redis: Redis, pool: aiomysql.Pool, case: str, body: Any
) -> None:
    response = await client.post("/admin/coupons", json=body, headers=ADMIN)
    await assert_problem(response, 400, "INVALID_REQUEST")
    await assert_no_coupon_created(pool, redis)


async def test_create_with_non_json_body_is_400_and_creates_nothing(
    client: Client, redis: Redis, pool: aiomysql.Pool
) -> None:
    response = await client.post(
        "/admin/coupons",
        data=b"title=x",
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    await assert_problem(response, 400, "INVALID_REQUEST")
    await assert_no_coupon_created(pool, redis)


# --------------------------------------------------------------------------------------------
# 2. GET /admin/coupons/{id}


async def test_admin_counters_close_before_and_after_drain(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=3, title="counted")
    body = await admin_counters(client, coupon.id)
    assert body["id"] == coupon.id
    assert body["title"] == "counted"
    assert counters_of(body) == {
        "requested": 0, "issued": 0, "pending": 0, "dead_lettered": 0, "remaining": 3,
    }  # fmt: skip

    for user in (1, 2, 3):
        assert (await issue(client, coupon.id, user))[0] == 202
    assert (await issue(client, coupon.id, 4))[0] == 409
    assert counters_of(await admin_counters(client, coupon.id)) == {
        "requested": 3, "issued": 0, "pending": 3, "dead_lettered": 0, "remaining": 0,
    }  # fmt: skip

    # Dead-letter user 1's request the way a worker gives up on it: the slot comes back.
    reply: Any = await redis.xreadgroup(
        keys.GROUP, "probe", {keys.CouponKeys(coupon.id).requests: ">"}, count=1
    )
    entry_id = reply[0][1][0][0]
    assert await Scripts(redis).release(coupon.id, entry_id, 1, "test_release", 1)
    assert counters_of(await admin_counters(client, coupon.id)) == {
        "requested": 3, "issued": 0, "pending": 2, "dead_lettered": 1, "remaining": 1,
    }  # fmt: skip

    await drain(redis, pool, settings)
    body = await admin_counters(client, coupon.id)
    assert counters_of(body) == {
        "requested": 3, "issued": 2, "pending": 0, "dead_lettered": 1, "remaining": 1,
    }  # fmt: skip
    assert body["issued_quantity"] == 2
    await check_invariants(coupon, accepted={1, 2, 3}, rejected={4})


async def test_admin_counters_of_unlimited_coupon_have_null_remaining(
    client: Client, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=None)
    body = await admin_counters(client, coupon.id)
    assert body["remaining"] is None
    assert body["requested"] == 0


async def test_admin_show_unknown_is_404_bad_id_400_no_token_401(
    client: Client, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=1)
    await assert_problem(
        await client.get("/admin/coupons/987654", headers=ADMIN), 404, "COUPON_NOT_EXIST"
    )
    await assert_problem(
        await client.get("/admin/coupons/nope", headers=ADMIN), 400, "INVALID_REQUEST"
    )
    await assert_problem(await client.get(f"/admin/coupons/{coupon.id}"), 401, "UNAUTHORIZED")
    await assert_problem(
        await client.get(
            f"/admin/coupons/{coupon.id}", headers={"Authorization": "Bearer not-the-token-123456"}
        ),
        401,
        "UNAUTHORIZED",
    )


# --------------------------------------------------------------------------------------------
# 3. couponctl


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


async def _drop_database(pool: aiomysql.Pool, name: str) -> None:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (name,)
        )
        if await cur.fetchone():
            await cur.execute(f"DROP DATABASE `{name}`")
        await conn.commit()


async def test_couponctl_db_migrate_applies_once_and_is_idempotent(
    settings: Settings, pool: aiomysql.Pool
) -> None:
    # A fresh database of its own, so the first run has something to apply.
    fresh = settings.replace(mysql_url=settings.mysql_url.rsplit("/", 1)[0] + "/coupon_cli_fresh")
    await _drop_database(pool, "coupon_cli_fresh")
    try:
        code, out, err = await couponctl(fresh, "--json", "db", "migrate")
        assert code == 0, err
        first = orjson.loads(out)
        assert first["database"] == "coupon_cli_fresh"
        assert first["applied"]
        code, out, err = await couponctl(fresh, "--json", "db", "migrate")
        assert code == 0, err
        assert orjson.loads(out)["applied"] == []
    finally:
        await _drop_database(pool, "coupon_cli_fresh")


async def test_couponctl_creates_a_coupon_that_issues_and_shows(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    check_invariants: Checker,
) -> None:
    code, out, err = await couponctl(
        settings, "--json", "coupon", "create", "--title", "cli drop", "--total", "5",
        "--minutes", "10",
    )  # fmt: skip
    assert code == 0, err
    created = orjson.loads(out)
    coupon_id = created["id"]
    assert created["title"] == "cli drop"
    assert created["total_quantity"] == 5
    start = datetime.fromisoformat(created["date_issue_start"])
    end = datetime.fromisoformat(created["date_issue_end"])
    assert end - start == timedelta(minutes=10)

    # Ready to issue through the gateway straight away.
    assert (await issue(client, coupon_id, 1))[0] == 202

    code, out, err = await couponctl(settings, "--json", "coupon", "show", str(coupon_id))
    assert code == 0, err
    shown = orjson.loads(out)
    assert shown["id"] == coupon_id
    assert shown["title"] == "cli drop"
    assert (shown["requested"], shown["pending"], shown["remaining"]) == (1, 1, 4)

    await drain(redis, pool, settings)
    coupon = await coupon_rows.fetch_coupon(pool, coupon_id)
    assert isinstance(coupon, Coupon)
    await check_invariants(coupon, accepted={1})


async def test_couponctl_show_of_unknown_coupon_fails_in_one_line(
    settings: Settings, pool: aiomysql.Pool, redis: Redis
) -> None:
    code, out, err = await couponctl(settings, "coupon", "show", "424242")
    assert out == ""
    assert_one_line_error(code, err, "424242")


async def test_couponctl_rejects_negative_total_in_one_line(
    settings: Settings, pool: aiomysql.Pool, redis: Redis
) -> None:
    code, _, err = await couponctl(settings, "coupon", "create", "--title", "t", "--total", "-5")
    assert_one_line_error(code, err, "total_quantity")
    await assert_no_coupon_created(pool, redis)


async def test_couponctl_rejects_non_integer_total_without_traceback(
    settings: Settings, pool: aiomysql.Pool, redis: Redis
) -> None:
    code, _, err = await couponctl(settings, "coupon", "create", "--title", "t", "--total", "abc")
    # argparse prints its usage line before the error; the error line names the option.
    assert code != 0
    assert "Traceback" not in err, err
    assert "--total" in err.strip().splitlines()[-1], err
    await assert_no_coupon_created(pool, redis)


async def test_couponctl_bad_configuration_fails_in_one_line(settings: Settings) -> None:
    code, _, err = await couponctl(
        settings, "coupon", "show", "1", env={"COUPON_MYSQL_URL": "postgres://u:p@h/db"}
    )
    assert_one_line_error(code, err, "COUPON_MYSQL_URL")


# --------------------------------------------------------------------------------------------
# 4. Settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COUPON_HTTP_PORT", "abc"),
        ("COUPON_HTTP_PORT", "0"),
        ("COUPON_HTTP_PORT", "70000"),
        ("COUPON_ADMIN_TOKEN", "short"),
        ("COUPON_MYSQL_URL", "postgres://u:p@127.0.0.1:5432/coupon"),
        ("COUPON_MYSQL_URL", "mysql://u:p@127.0.0.1:3306/"),
        ("COUPON_MYSQL_URL", "mysql://u:p@127.0.0.1:notaport/coupon"),
        ("COUPON_REDIS_URL", "http://127.0.0.1:6379/0"),
        ("COUPON_LOG_FORMAT", "xml"),
        ("COUPON_LOG_LEVEL", "loud"),
        ("COUPON_WORKERS", "-1"),
        ("COUPON_WORKERS", "two"),
        ("COUPON_MAX_DELIVERIES", "0"),
        ("COUPON_REDIS_TIMEOUT_SECONDS", "soon"),
    ],
)
def test_bad_setting_raises_config_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COUPON_REDIS_TIMEOUT_SECONDS", "0"),
        ("COUPON_REDIS_TIMEOUT_SECONDS", "-1"),
        ("COUPON_SNAPSHOT_TTL_SECONDS", "-1"),
        ("COUPON_SHUTDOWN_GRACE_SECONDS", "-1"),
    ],
)
def test_non_positive_durations_raise_config_error_naming_the_variable(
    variable: str, value: str
) -> None:
    # A zero or negative Redis timeout makes the gateway die at start with a misleading
    # "Timeout connecting to server" (or time out every call); it must be refused up front.
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_settings_round_trip_through_the_environment(settings: Settings) -> None:
    assert Settings.from_env(settings.to_env()) == settings
    defaults = Settings(worker_name="w1")
    assert Settings.from_env(defaults.to_env()) == defaults
    # Unset and empty variables mean the defaults; unknown ones are ignored.
    assert Settings.from_env({"COUPON_WORKER_NAME": "w1", "COUPON_HTTP_HOST": ""}) == defaults
    assert Settings.from_env({"COUPON_WORKER_NAME": "w1", "COUPON_UNKNOWN": "x"}) == defaults


def test_to_env_omits_unset_admin_token() -> None:
    env = Settings(admin_token=None).to_env()
    assert "COUPON_ADMIN_TOKEN" not in env
    assert Settings.from_env(env).admin_token is None
