"""The public gateway routes over HTTP, against the real app on real Redis and MariaDB.

Covers input validation (every malformed request is a 400/404/405/413 problem+json that writes
nothing), the business rejections (404/409 codes), the status and snapshot routes, the sold-out
short-circuit and request coalescing (counted with Redis ``INFO commandstats``), fast 503s when
Redis is stopped or stalled, the operations routes, unlimited coupons and the issue window as
judged by Redis server time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomysql
import pytest
from aiohttp.test_utils import TestClient, TestServer
from mirakuru import TCPExecutor
from redis.asyncio import Redis

from gateway import appkeys
from gateway.app import create_app
from shared import keys
from shared.model import Coupon
from shared.mysql import coupon_rows
from shared.redis import client as redis_client
from shared.redis.scripts import Scripts
from shared.settings import Settings
from tests.conftest import CouponFactory
from tests.helpers import ADMIN, assert_problem, drain, issue, row_count, wait_for
from tests.invariants import Checker
from tests.servers import find_binary, free_port

Client = TestClient[Any, Any]


# --------------------------------------------------------------------------------------------
# helpers


async def evalsha_calls(redis: Redis) -> int:
    """How many EVALSHA commands this Redis has run since start (or the last stats reset)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def all_keys(redis: Redis) -> set[str]:
    """Every key but the state marker a fresh system gets at gateway start."""
    return {str(key) for key in await redis.keys("*")} - {keys.STATE_MARKER}


async def assert_nothing_written(redis: Redis, coupon: Coupon, before: set[str]) -> None:
    """No key appeared and no request reached the coupon's stream."""
    assert await all_keys(redis) == before
    assert await redis.xlen(keys.CouponKeys(coupon.id).requests) == 0
    assert await redis.scard(keys.CouponKeys(coupon.id).users) == 0


async def read_one_pending(redis: Redis, coupon_id: int, consumer: str = "probe") -> str:
    """Deliver the oldest undelivered entry to ``consumer`` so it is pending in the group."""
    reply: Any = await redis.xreadgroup(
        keys.GROUP, consumer, {keys.CouponKeys(coupon_id).requests: ">"}, count=1
    )
    assert reply, "no entry to read"
    _stream, entries = reply[0]
    entry_id: str = entries[0][0]
    return entry_id


def window(start_in: float, end_in: float) -> dict[str, datetime]:
    """start/end relative to now, in seconds."""
    now = datetime.now(UTC)
    return {"start": now + timedelta(seconds=start_in), "end": now + timedelta(seconds=end_in)}


# --------------------------------------------------------------------------------------------
# 1. malformed input


BAD_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("not_json", {"data": b"user_id=1", "headers": {"Content-Type": "application/json"}}),
    ("empty_body", {"data": b""}),
    ("invalid_utf8", {"data": b'{"user_id": "\xff"}'}),
    ("json_array", {"json": [1]}),
    ("json_number", {"json": 5}),
    ("json_null", {"json": None}),
    ("missing_user_id", {"json": {}}),
    ("camel_case_user_id", {"json": {"userId": 5}}),
    ("user_id_null", {"json": {"user_id": None}}),
    ("user_id_string", {"json": {"user_id": "5"}}),
    ("user_id_float", {"json": {"user_id": 5.0}}),
    ("user_id_bool", {"json": {"user_id": True}}),
    ("user_id_zero", {"json": {"user_id": 0}}),
    ("user_id_negative", {"json": {"user_id": -1}}),
    ("user_id_2_63", {"json": {"user_id": 2**63}}),
    ("user_id_2_64", {"json": {"user_id": 2**64}}),
    ("user_id_list", {"json": {"user_id": [5]}}),
]


@pytest.mark.parametrize(("case", "kwargs"), BAD_BODIES, ids=[case for case, _ in BAD_BODIES])
async def test_malformed_issue_body_is_400_and_writes_nothing(
    client: Client, redis: Redis, make_coupon: CouponFactory, case: str, kwargs: dict[str, Any]
) -> None:
    coupon = await make_coupon(total=5)
    before = await all_keys(redis)
    response = await client.post(f"/v1/coupons/{coupon.id}/issues", **kwargs)
    await assert_problem(response, 400, "INVALID_REQUEST")
    await assert_nothing_written(redis, coupon, before)


BAD_PATH_IDS = [
    "abc",
    "0",
    "-1",
    "+1",
    "1e3",
    "1.0",
    "0x1f",
    "12345678901234567890",  # 20 digits
    str(2**63),  # one past the largest id
    "١٢٣",  # Arabic-Indic digits: str.isdigit() says yes, the API says no
    "１２",  # fullwidth digits
    "%20",
]


@pytest.mark.parametrize("raw_id", BAD_PATH_IDS)
async def test_malformed_coupon_id_is_400_and_writes_nothing(
    client: Client, redis: Redis, make_coupon: CouponFactory, raw_id: str
) -> None:
    coupon = await make_coupon(total=5)
    before = await all_keys(redis)
    response = await client.post(f"/v1/coupons/{raw_id}/issues", json={"user_id": 1})
    await assert_problem(response, 400, "INVALID_REQUEST")
    await assert_nothing_written(redis, coupon, before)


async def test_largest_valid_ids_are_accepted_as_input(client: Client, redis: Redis) -> None:
    # 2**63-1 is a valid id: an unknown coupon is a 404, not a 400, and not a 5xx.
    response = await client.post(f"/v1/coupons/{2**63 - 1}/issues", json={"user_id": 2**63 - 1})
    await assert_problem(response, 404, "COUPON_NOT_EXIST")
    assert await all_keys(redis) == set()


async def test_body_over_the_size_limit_is_413_and_writes_nothing(
    client: Client, redis: Redis, settings: Settings, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=5)
    before = await all_keys(redis)
    padding = "x" * (settings.max_body_bytes + 100)
    response = await client.post(
        f"/v1/coupons/{coupon.id}/issues", json={"user_id": 1, "padding": padding}
    )
    await assert_problem(response, 413)
    await assert_nothing_written(redis, coupon, before)


async def test_unknown_route_is_404_problem(client: Client) -> None:
    response = await client.get("/v1/nothing/here")
    await assert_problem(response, 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/coupons/1/issues", {"POST"}),
        ("DELETE", "/v1/coupons/1", {"GET", "HEAD"}),
        ("PUT", "/healthz", {"GET", "HEAD"}),
    ],
)
async def test_wrong_method_is_405_problem_naming_the_allowed_methods(
    client: Client, method: str, path: str, allowed: set[str]
) -> None:
    response = await client.request(method, path)
    await assert_problem(response, 405)
    assert set(response.headers["Allow"].split(",")) == allowed


# --------------------------------------------------------------------------------------------
# 2. business rejections


async def test_unknown_coupon_is_404_coupon_not_exist(client: Client, redis: Redis) -> None:
    response = await client.post("/v1/coupons/424242/issues", json={"user_id": 1})
    await assert_problem(response, 404, "COUPON_NOT_EXIST")
    # The lookup of an unknown id must not create state for it.
    assert await all_keys(redis) == set()


async def test_second_request_of_same_user_is_409_duplicate(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=5)
    assert (await issue(client, coupon.id, 1))[0] == 202
    response = await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 1})
    await assert_problem(response, 409, "DUPLICATED_COUPON_ISSUE")
    # Still a duplicate once the row exists.
    await drain(redis, pool, settings)
    response = await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 1})
    await assert_problem(response, 409, "DUPLICATED_COUPON_ISSUE")
    snap = await check_invariants(coupon, accepted={1})
    assert snap.requested == 1


async def test_request_after_stock_is_gone_is_409_sold_out(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=2)
    assert (await issue(client, coupon.id, 1))[0] == 202
    assert (await issue(client, coupon.id, 2))[0] == 202
    for user in (3, 4):
        response = await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": user})
        await assert_problem(response, 409, "INVALID_COUPON_ISSUE_QUANTITY")
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1, 2}, rejected={3, 4})
    assert await row_count(pool, coupon.id) == 2


@pytest.mark.parametrize(
    ("start_in", "end_in"),
    [(3600, 7200), (-7200, -3600)],
    ids=["not_started", "ended"],
)
async def test_request_outside_window_is_409_date(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
    start_in: int,
    end_in: int,
) -> None:
    coupon = await make_coupon(total=5, **window(start_in, end_in))
    # Twice: the first judged by Lua (no clock offset known yet), the second maybe locally.
    for user in (1, 2):
        response = await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": user})
        await assert_problem(response, 409, "INVALID_COUPON_ISSUE_DATE")
    assert await redis.xlen(keys.CouponKeys(coupon.id).requests) == 0
    await drain(redis, pool, settings)
    await check_invariants(coupon, rejected={1, 2})


# --------------------------------------------------------------------------------------------
# 3. status route


async def test_status_goes_not_found_then_pending_then_issued(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=5)
    path = f"/v1/coupons/{coupon.id}/issues/9"
    await assert_problem(await client.get(path), 404, "ISSUE_NOT_FOUND")
    assert (await issue(client, coupon.id, 9))[0] == 202
    response = await client.get(path)
    assert response.status == 200
    assert await response.json() == {"coupon_id": coupon.id, "user_id": 9, "status": "pending"}
    await drain(redis, pool, settings)
    response = await client.get(path)
    assert (await response.json())["status"] == "issued"
    # A user who was rejected has no issue to show.
    await assert_problem(
        await client.get(f"/v1/coupons/{coupon.id}/issues/10"), 404, "ISSUE_NOT_FOUND"
    )
    await check_invariants(coupon, accepted={9})


async def test_status_of_unknown_coupon_is_404_coupon_not_exist(client: Client) -> None:
    await assert_problem(await client.get("/v1/coupons/777/issues/1"), 404, "COUPON_NOT_EXIST")


@pytest.mark.parametrize(
    "path",
    ["/v1/coupons/abc/issues/1", "/v1/coupons/1/issues/0", "/v1/coupons/1/issues/-5",
     f"/v1/coupons/1/issues/{2**63}", "/v1/coupons/1/issues/1e3"],
)  # fmt: skip
async def test_status_with_bad_ids_is_400(client: Client, path: str) -> None:
    await assert_problem(await client.get(path), 400, "INVALID_REQUEST")


# --------------------------------------------------------------------------------------------
# 4. coupon snapshot


async def test_snapshot_shows_fields_and_remaining_down_to_sold_out(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=2, title="spring drop")

    async def snapshot() -> dict[str, Any]:
        response = await client.get(f"/v1/coupons/{coupon.id}")
        assert response.status == 200
        assert response.content_type == "application/json"
        body: dict[str, Any] = await response.json()
        return body

    body = await snapshot()
    assert body["id"] == coupon.id
    assert body["title"] == "spring drop"
    assert body["total_quantity"] == 2
    assert body["remaining"] == 2
    assert body["sold_out"] is False
    assert body["discount_amount"] == 1000
    assert body["min_available_amount"] == 10000
    # Wire timestamps carry an offset and match the coupon to the millisecond.
    for field, expected in (
        ("date_issue_start", coupon.date_issue_start),
        ("date_issue_end", coupon.date_issue_end),
    ):
        parsed = datetime.fromisoformat(body[field])
        assert parsed.tzinfo is not None
        assert abs(parsed - expected) < timedelta(milliseconds=1)

    assert (await issue(client, coupon.id, 1))[0] == 202
    body = await snapshot()
    assert (body["remaining"], body["sold_out"]) == (1, False)
    assert (await issue(client, coupon.id, 2))[0] == 202
    body = await snapshot()
    assert (body["remaining"], body["sold_out"]) == (0, True)
    await drain(redis, pool, settings)
    body = await snapshot()
    assert (body["remaining"], body["sold_out"]) == (0, True)
    await check_invariants(coupon, accepted={1, 2})


async def test_snapshot_of_unlimited_coupon_has_null_remaining(
    client: Client, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=None)
    response = await client.get(f"/v1/coupons/{coupon.id}")
    body = await response.json()
    assert body["total_quantity"] is None
    assert body["remaining"] is None
    assert body["sold_out"] is False


async def test_snapshot_of_unknown_coupon_is_404_and_bad_id_400(client: Client) -> None:
    await assert_problem(await client.get("/v1/coupons/31337"), 404, "COUPON_NOT_EXIST")
    await assert_problem(await client.get("/v1/coupons/x1"), 400, "INVALID_REQUEST")


# --------------------------------------------------------------------------------------------
# 5. sold-out short-circuit


async def test_sold_out_coupon_is_answered_without_script_and_notices_released_slot(
    aiohttp_client: Any,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    # A snapshot TTL far beyond the test's deadlines: only the pub/sub message can clear the
    # sold-out flag in time, so the second half proves the message is acted on.
    client: Client = await aiohttp_client(create_app(settings.replace(snapshot_ttl_seconds=120)))
    # The app's listener must be subscribed before anything is published.
    await wait_for(lambda: _subscribers(redis), within=10)
    coupon = await make_coupon(total=2)
    assert (await issue(client, coupon.id, 1))[0] == 202
    assert (await issue(client, coupon.id, 2))[0] == 202
    rejected = {3}
    await assert_problem(
        await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 3}),
        409,
        "INVALID_COUPON_ISSUE_QUANTITY",
    )

    extra = 20
    calls_before = await evalsha_calls(redis)
    for user in range(100, 100 + extra):
        # One at a time: concurrent requests would be coalesced and prove nothing here.
        status, body = await issue(client, coupon.id, user)
        assert (status, body["code"]) == (409, "INVALID_COUPON_ISSUE_QUANTITY")
        rejected.add(user)
    grown = await evalsha_calls(redis) - calls_before
    assert grown <= 1, f"{grown} script calls for {extra} requests on a sold-out coupon"

    # Release user 1's slot the way a worker dead-letters a hopeless entry.
    entry_id = await read_one_pending(redis, coupon.id)
    released = await Scripts(redis).release(coupon.id, entry_id, 1, "test_release", 1)
    assert released
    status_body = await (await client.get(f"/v1/coupons/{coupon.id}/issues/1")).json()
    assert status_body["status"] == "failed"

    next_user = iter(range(1000, 2000))
    winner: list[int] = []

    async def a_new_user_is_accepted() -> bool:
        user = next(next_user)
        status, _ = await issue(client, coupon.id, user)
        if status == 202:
            winner.append(user)
            return True
        assert status == 409
        rejected.add(user)
        return False

    await wait_for(a_new_user_is_accepted, within=10, interval=0.05)
    # The freed slot is taken once; the coupon is sold out again.
    status, body = await issue(client, coupon.id, 5000)
    assert (status, body["code"]) == (409, "INVALID_COUPON_ISSUE_QUANTITY")
    rejected.add(5000)

    await drain(redis, pool, settings)
    snap = await check_invariants(coupon, accepted={1, 2, *winner}, rejected=rejected)
    assert set(snap.rows) == {2, *winner}
    assert snap.dead_users == {1}


async def _subscribers(redis: Redis) -> bool:
    counts = dict(await redis.pubsub_numsub(keys.CHANGES_CHANNEL))
    return int(counts.get(keys.CHANGES_CHANNEL, 0)) >= 1


# --------------------------------------------------------------------------------------------
# 6. coalescing


async def test_concurrent_requests_share_few_script_calls(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=1000)
    # Warm the snapshot and load the script so the count below is about reservations only.
    assert (await issue(client, coupon.id, 1))[0] == 202
    users = range(2, 202)
    calls_before = await evalsha_calls(redis)
    results = await asyncio.gather(*(issue(client, coupon.id, user) for user in users))
    calls = await evalsha_calls(redis) - calls_before
    assert [status for status, _ in results] == [202] * len(users)
    request_ids = [body["request_id"] for _, body in results]
    assert len(set(request_ids)) == len(users)
    assert 1 <= calls < len(users) / 2, f"{calls} script calls for {len(users)} requests"
    await drain(redis, pool, settings)
    snap = await check_invariants(coupon, accepted={1, *users})
    assert len(snap.rows) == len(users) + 1
    # Each row carries the request id its 202 announced.
    assert {snap.rows[user] for user in users} == set(request_ids)


async def test_requests_queued_behind_the_call_that_sells_out_get_sold_out_without_a_call(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    """The sell-out moment of a drop: thousands wait behind the call that takes the last
    coupon. That call's answer (nothing left) settles them all at once, instead of each
    waiting for a further call that could only say the same."""
    coupon = await make_coupon(total=2)
    assert (await issue(client, coupon.id, 1))[0] == 202  # snapshot and script warm
    coalescer = client.app[appkeys.COALESCER]
    calls_before = await evalsha_calls(redis)
    # Redis holds writes: the call for user 2 (the last coupon) stays in flight, the next
    # requests queue behind it.
    await redis.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
    try:
        last = asyncio.create_task(issue(client, coupon.id, 2))

        async def in_flight() -> bool:
            return coalescer.oldest_wait(time.monotonic()) > 0 and not coalescer.waiting(coupon.id)

        await wait_for(in_flight)
        queued_users = range(10, 60)
        queued = [asyncio.create_task(issue(client, coupon.id, user)) for user in queued_users]

        async def all_queued() -> bool:
            return coalescer.waiting(coupon.id) == len(queued_users)

        await wait_for(all_queued)
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    assert (await last)[0] == 202
    for status, body in await asyncio.gather(*queued):
        assert (status, body["code"]) == (409, "INVALID_COUPON_ISSUE_QUANTITY"), body
    assert await evalsha_calls(redis) - calls_before == 1
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1, 2}, rejected=set(queued_users))


# --------------------------------------------------------------------------------------------
# 7. Redis down


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[TCPExecutor]:
    """A redis-server of this test's own, free to be stopped or frozen."""
    binary = find_binary("redis-server")
    port = free_port()
    executor = TCPExecutor(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        host="127.0.0.1",
        port=port,
        timeout=30,
    )  # fmt: skip
    executor.start()
    yield executor
    if executor.running() and executor.process is not None:
        # A frozen server would ignore SIGTERM until thawed.
        os.kill(executor.process.pid, signal.SIGCONT)
        executor.stop()


def _redis_url(executor: TCPExecutor) -> str:
    return f"redis://127.0.0.1:{executor.port}/0"


def _coupon_body(total: int | None) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "title": "fault drop",
        "total_quantity": total,
        "date_issue_start": (now - timedelta(minutes=1)).isoformat(),
        "date_issue_end": (now + timedelta(hours=1)).isoformat(),
    }


async def _assert_503(response: Any) -> None:
    await assert_problem(response, 503, "FAIL_COUPON_ISSUE_REQUEST")
    assert response.headers.get("Retry-After", "").isdigit(), dict(response.headers)


async def test_issue_is_503_with_retry_after_when_redis_is_stopped(
    private_redis: TCPExecutor, settings: Settings, pool: aiomysql.Pool
) -> None:
    app = create_app(settings.replace(redis_url=_redis_url(private_redis)))
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/admin/coupons", json=_coupon_body(5), headers=ADMIN)
        assert response.status == 201
        coupon_id = (await response.json())["id"]
        assert (await client.get(f"/v1/coupons/{coupon_id}")).status == 200

        await asyncio.to_thread(private_redis.stop)
        await _assert_503(await client.post(f"/v1/coupons/{coupon_id}/issues", json={"user_id": 1}))
        ready = await client.get("/readyz")
        assert ready.status == 503
        # Not the exception's class: that is for the log, not for whoever asks.
        assert (await ready.json())["redis"] == "unreachable"
        assert (await client.get("/healthz")).status == 200
        # An admin route whose store is gone is a 503 the client may retry, not a 500.
        await _assert_503(await client.get(f"/admin/coupons/{coupon_id}", headers=ADMIN))
        await _assert_503(
            await client.patch(f"/admin/coupons/{coupon_id}", json={"title": "x"}, headers=ADMIN)
        )
        await _assert_503(await client.post("/admin/coupons", json=_coupon_body(5), headers=ADMIN))


async def test_issue_is_503_while_redis_stalls_and_recovers_after(
    private_redis: TCPExecutor, settings: Settings, pool: aiomysql.Pool
) -> None:
    fault_settings = settings.replace(redis_url=_redis_url(private_redis))
    app = create_app(fault_settings)
    direct = redis_client.connect(fault_settings.redis_url, socket_timeout=5.0)
    assert private_redis.process is not None
    pid = private_redis.process.pid
    try:
        async with TestClient(TestServer(app)) as client:
            response = await client.post("/admin/coupons", json=_coupon_body(5), headers=ADMIN)
            assert response.status == 201
            coupon = await coupon_rows.fetch_coupon(pool, (await response.json())["id"])
            assert coupon is not None
            assert (await issue(client, coupon.id, 1))[0] == 202

            os.kill(pid, signal.SIGSTOP)
            try:
                # The outcome of user 2 is unknown (the stalled server may still run the
                # call later), so user 2 is neither accepted nor rejected below.
                await _assert_503(
                    await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 2})
                )
                assert (await client.get("/readyz")).status == 503
                assert (await client.get("/healthz")).status == 200
            finally:
                os.kill(pid, signal.SIGCONT)

            async def ready() -> bool:
                return (await client.get("/readyz")).status == 200

            await wait_for(ready, within=10)
            assert (await issue(client, coupon.id, 3))[0] == 202
        await drain(direct, pool, settings)
        await Checker(pool, direct)(coupon, accepted={1, 3})
    finally:
        await direct.aclose()


# --------------------------------------------------------------------------------------------
# 8. operations routes


async def test_healthz_and_readyz_are_200_with_both_stores_up(client: Client) -> None:
    health = await client.get("/healthz")
    assert health.status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    body = await ready.json()
    assert (body["ready"], body["redis"], body["mysql"]) == (True, "ok", "ok")


def _metric_value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_issue_requests(client: Client, make_coupon: CouponFactory) -> None:
    sample = 'coupon_issue_requests_total{outcome="invalid"}'
    before = _metric_value(await (await client.get("/metrics")).text(), sample)
    await client.post("/v1/coupons/1/issues", json={"user_id": "nope"})
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert "# TYPE coupon_issue_requests_total counter" in text
    assert _metric_value(text, sample) == before + 1


async def test_hello_says_hello(client: Client) -> None:
    response = await client.get("/hello")
    assert response.status == 200
    assert await response.text() == "hello!"


async def test_request_id_is_echoed_or_generated(client: Client) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "trace-abc-123"})
    assert response.headers["X-Request-ID"] == "trace-abc-123"
    # Errors carry it too.
    response = await client.get("/nowhere", headers={"X-Request-ID": "trace-404"})
    assert response.headers["X-Request-ID"] == "trace-404"
    first = (await client.get("/healthz")).headers.get("X-Request-ID")
    second = (await client.get("/healthz")).headers.get("X-Request-ID")
    assert first
    assert second
    assert first != second


# --------------------------------------------------------------------------------------------
# 9. unlimited coupon


async def test_unlimited_coupon_accepts_every_distinct_user(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=None)
    users = range(1, 51)
    results = await asyncio.gather(*(issue(client, coupon.id, user) for user in users))
    assert [status for status, _ in results] == [202] * 50
    await drain(redis, pool, settings)
    assert await row_count(pool, coupon.id) == 50
    await check_invariants(coupon, accepted=set(users))


# --------------------------------------------------------------------------------------------
# 10. window edges, judged by Redis TIME


async def _entry_times(redis: Redis, coupon_id: int) -> dict[int, int]:
    """user -> Redis time (ms) at which the Lua script accepted them."""
    entries: Any = await redis.xrange(keys.CouponKeys(coupon_id).requests)
    return {int(fields["u"]): int(fields["t"]) for _, fields in entries}


async def test_coupon_starting_soon_rejects_now_and_accepts_once_started(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=5, **window(1.5, 3600))
    response = await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 1})
    await assert_problem(response, 409, "INVALID_COUPON_ISSUE_DATE")

    async def accepted() -> bool:
        status, body = await issue(client, coupon.id, 1)
        assert status in (202, 409), body
        return status == 202

    await wait_for(accepted, within=10, interval=0.05)
    # Start is inclusive and judged by Redis: the acceptance happened at or after it.
    assert (await _entry_times(redis, coupon.id))[1] >= coupon.start_ms
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1})


async def test_coupon_ending_soon_accepts_now_and_rejects_once_ended(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=1000, **window(-60, 1.5))
    accepted: set[int] = set()
    rejected: set[int] = set()
    next_user = iter(range(1, 10_000))

    async def rejected_as_ended() -> bool:
        user = next(next_user)
        status, body = await issue(client, coupon.id, user)
        if status == 202:
            accepted.add(user)
            return False
        assert (status, body["code"]) == (409, "INVALID_COUPON_ISSUE_DATE"), body
        rejected.add(user)
        return True

    assert not await rejected_as_ended()
    await wait_for(rejected_as_ended, within=10, interval=0.05)
    # End is exclusive and judged by Redis: everything accepted was strictly before it.
    times = await _entry_times(redis, coupon.id)
    assert set(times) == accepted
    assert max(times.values()) < coupon.end_ms
    # Once closed it stays closed.
    assert (await issue(client, coupon.id, 99_999))[0] == 409
    rejected.add(99_999)
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted=accepted, rejected=rejected)
