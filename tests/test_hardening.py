"""What a black-box attack on the running service found, each fixed and pinned here: a stray
byte in ``X-Request-ID`` on any route, request ids that counted the traffic, an unbounded
negative cache and unlimited public reads, tokens that never expire, a ``Server`` header with
versions, ``/%61dmin/`` slipping past a prefix filter, windows too short to issue anything,
and, against a real gateway process, HTTP parser errors
that echoed the request, bodies and idle connections held without a time limit, and the ops
routes on the public port. (Secrets in the log during a store outage: tests/fault.)"""

from __future__ import annotations

import asyncio
import itertools
import string
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import jwt
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway import appkeys
from gateway.app import create_app
from gateway.snapshots import SnapshotCache
from shared.settings import Settings
from tests.conftest import CouponFactory
from tests.helpers import (
    ADMIN,
    REPO,
    GatewayProcess,
    answers_ok,
    assert_problem,
    drain,
    free_port,
    wait_for,
)
from tests.invariants import Checker

Client = TestClient[Any, Any]
BAD_ID = {"X-Request-ID": "\xff"}


def _window_body(**changes: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    body = {
        "title": "hardening",
        "total_quantity": 10,
        "date_issue_start": (now - timedelta(minutes=1)).isoformat(),
        "date_issue_end": (now + timedelta(hours=1)).isoformat(),
    }
    return {**body, **changes}


def _assert_id_replaced(response: aiohttp.ClientResponse) -> None:
    request_id = response.headers["X-Request-ID"]
    assert request_id != "\xff"
    assert request_id.isascii()
    assert request_id.isprintable()


async def test_a_stray_byte_in_the_request_id_changes_nothing_on_any_route(
    client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    """One invalid UTF-8 byte in X-Request-ID used to turn a success into an unlogged 500
    after the reservation (or the admin change) was made."""
    coupon = await make_coupon(total=10)
    answers = [
        ("POST", f"/v1/coupons/{coupon.id}/issues", {"user_id": 1}, 202),
        ("POST", "/v1/issue-async", {"userId": 2, "couponId": coupon.id}, 200),
        ("POST", "/v2/issue-async", {"userId": 3, "couponId": coupon.id}, 200),
        ("POST", "/v1/issue", {"userId": 4, "couponId": coupon.id}, 200),
        ("GET", f"/v1/coupons/{coupon.id}/issues/1", None, 200),
        ("GET", f"/v1/coupons/{coupon.id}", None, 200),
        ("PATCH", f"/admin/coupons/{coupon.id}", {"title": "renamed"}, 200),
        ("GET", f"/admin/coupons/{coupon.id}", None, 200),
        ("GET", "/admin/coupons", None, 200),
        ("POST", "/admin/coupons", _window_body(), 201),
        ("GET", "/healthz", None, 200),
        ("GET", "/readyz", None, 200),
        ("GET", "/metrics", None, 200),
        ("GET", "/openapi.json", None, 200),
        ("GET", "/hello", None, 200),
        ("GET", "/no/such/route", None, 404),
    ]
    for method, path, body, status in answers:
        response = await client.request(method, path, json=body, headers={**ADMIN, **BAD_ID})
        assert response.status == status, (path, await response.text())
        _assert_id_replaced(response)
    # The changes were made, and the answers said so.
    snapshot = await (await client.get(f"/v1/coupons/{coupon.id}")).json()
    assert snapshot["title"] == "renamed"
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1, 2, 3, 4})


async def test_generated_request_ids_are_random_not_a_count(client: Client) -> None:
    ids = [(await client.get("/healthz")).headers["X-Request-ID"] for _ in range(50)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and set(i) <= set(string.hexdigits) for i in ids), ids[:3]
    numbers = sorted(int(i, 16) for i in ids)
    assert max(b - a for a, b in itertools.pairwise(numbers)) > 1000  # a counter: all 1


async def test_every_answer_names_the_service_without_versions(
    client: Client, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=1)
    for response in (
        await client.get("/healthz"),
        await client.get("/no/such/route"),
        await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": "x"}),
        await client.get("/metrics"),
    ):
        assert response.headers["Server"] == "coupon-gateway", dict(response.headers)


async def test_the_snapshot_cache_stays_bounded_under_an_enumeration_of_unknown_ids(
    redis: Redis, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=5)
    cache = SnapshotCache(redis, ttl=60.0, max_entries=100)
    assert (await cache.get(coupon.id)) is not None
    for unknown in range(10**9, 10**9 + 2_000):
        assert await cache.get(unknown) is None
        assert len(cache) <= 100
    # The oldest loads went first; a real coupon looked up again is loaded again, not lost.
    found = await cache.get(coupon.id)
    assert found is not None
    assert found.id == coupon.id


async def test_the_gateway_bounds_its_cache_and_limits_public_reads_per_address(
    aiohttp_client: Any, settings: Settings, make_coupon: CouponFactory
) -> None:
    client = await aiohttp_client(
        create_app(
            settings.replace(
                snapshot_cache_size=50, rate_limit_read_per_second=0.01, rate_limit_read_burst=60
            )
        )
    )
    coupon = await make_coupon(total=5)
    for unknown in range(10**9, 10**9 + 59):
        await assert_problem(await client.get(f"/v1/coupons/{unknown}"), 404)
    assert len(client.app[appkeys.SNAPSHOTS]) <= 50
    # The 61st read from this address within the burst is refused, with the time to wait.
    assert (await client.get(f"/v1/coupons/{coupon.id}")).status == 200
    refused = await client.get(f"/v1/coupons/{coupon.id}/issues/1")
    await assert_problem(refused, 429)
    assert int(refused.headers["Retry-After"]) >= 1
    # Issuing is limited separately (off here): the read limit does not touch it.
    assert (await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 1})).status == 202


async def test_a_window_shorter_than_a_millisecond_is_refused(client: Client) -> None:
    """Redis compares whole milliseconds: such a coupon was accepted and could never issue."""
    start = datetime.now(UTC).replace(microsecond=100)
    body = _window_body(
        date_issue_start=start.isoformat(),
        date_issue_end=(start + timedelta(microseconds=500)).isoformat(),
    )
    problem = await assert_problem(
        await client.post("/admin/coupons", json=body, headers=ADMIN), 400
    )
    assert "millisecond" in problem["detail"]


async def test_a_token_that_expires_beyond_the_maximum_lifetime_is_refused(
    aiohttp_client: Any, settings: Settings, make_coupon: CouponFactory
) -> None:
    secret = "s" * 40
    client = await aiohttp_client(
        create_app(settings.replace(auth="jwt", jwt_secret=secret, jwt_max_lifetime_seconds=3600))
    )
    coupon = await make_coupon(total=5)

    def bearer(user: int, lives: int) -> dict[str, str]:
        claims = {"sub": str(user), "exp": int(time.time()) + lives}
        return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}

    path = f"/v1/coupons/{coupon.id}/issues"
    refused = await client.post(path, json={}, headers=bearer(7, 2 * 86_400))
    problem = await assert_problem(refused, 401)
    assert "later than this service allows" in problem["detail"]
    assert (await client.post(path, json={}, headers=bearer(8, 1800))).status == 202


# --------------------------------------------------------------------------------------------
# Against a real gateway process: its listener, its HTTP parser, its timeouts.


async def _raw(port: int, data: bytes, *, within: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()


@pytest.fixture
def gateway_process(settings: Settings, tmp_path: Path) -> Any:
    def start(**env: str) -> GatewayProcess:
        return GatewayProcess(settings, tmp_path / f"gateway-{free_port()}.log", **env)

    return start


async def test_unparsable_requests_get_a_fixed_problem_that_echoes_nothing(
    gateway_process: Any,
) -> None:
    marker = b"ECHO-ME-" * 16
    with gateway_process() as gateway:
        bare_lf = b"GET /healthz?" + marker + b" HTTP/1.1\nHost: x\n\n"
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: " + marker * 800 + b"\r\n\r\n"
        for request in (bare_lf, huge, b"\x16\x03\x01" + marker + b"\r\n\r\n"):
            answer = await _raw(gateway.port, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400", answer[:200]  # HTTP/1.0: the version is unknown
            assert b"Content-Type: application/problem+json" in head, head
            assert b"Server: coupon-gateway" in head, head
            assert marker not in answer
            assert b'"code":"INVALID_REQUEST"' in body, body
        gateway.stop()
        assert marker.decode() not in gateway.output()


async def test_a_stalled_body_is_answered_408_and_an_idle_connection_is_closed(
    gateway_process: Any, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=5)
    with gateway_process(
        COUPON_BODY_READ_TIMEOUT_SECONDS="1", COUPON_KEEPALIVE_TIMEOUT_SECONDS="1"
    ) as gateway:
        half = (
            f"POST /v1/coupons/{coupon.id}/issues HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 20\r\n\r\n"
            '{"user_id"'
        ).encode()
        answer = await _raw(gateway.port, half)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"Connection: close" in answer
        # An idle keep-alive connection is closed by the server after its timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert first.startswith(b"HTTP/1.1 200")
            rest = await asyncio.wait_for(reader.read(), 10)  # EOF once the server closes
            assert b"HTTP/1.1" not in rest
        finally:
            writer.close()


async def test_encoded_admin_paths_are_not_found_even_with_the_token(
    gateway_process: Any,
) -> None:
    token = ADMIN["Authorization"]
    with gateway_process() as gateway:
        for path in ("/%61dmin/coupons", "/%61dmin/coupons/1", "/admin%2Fcoupons"):
            answer = await _raw(
                gateway.port,
                f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            assert answer.startswith(b"HTTP/1.1 404"), (path, answer[:200])
        answer = await _raw(
            gateway.port,
            f"GET /admin/coupons HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


async def test_ops_routes_can_live_on_the_admin_listener_alone(gateway_process: Any) -> None:
    admin_port = free_port()
    with gateway_process(
        COUPON_ADMIN_PORT=str(admin_port), COUPON_OPS_ON_ADMIN_PORT="1"
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            admin_metrics = f"http://127.0.0.1:{admin_port}/metrics"
            await wait_for(lambda: answers_ok(session, admin_metrics), within=10)
            for path in ("/metrics", "/openapi.json"):
                async with session.get(gateway.url + path) as response:
                    assert response.status == 404, path
                async with session.get(f"http://127.0.0.1:{admin_port}{path}") as response:
                    assert response.status == 200, path


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_logged_traceback_shows_no_local_variables(log_format: str) -> None:
    """structlog's JSON tracebacks (and its rich console ones) print every frame's locals; a
    database driver's connect frame holds the password, and that is how it reached the log."""
    program = f"""
import structlog
from shared import logging
logging.configure({log_format!r}, "info")
def connect(password):
    raise ConnectionError("cannot connect")
try:
    connect("pw-that-must-not-be-logged")
except ConnectionError:
    structlog.get_logger().exception("connect_failed")
"""
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, capture_output=True, timeout=60, check=True
    )
    output = (done.stdout + done.stderr).decode()
    assert "connect_failed" in output
    assert "cannot connect" in output  # the traceback itself is there
    assert "pw-that-must-not-be-logged" not in output, output
