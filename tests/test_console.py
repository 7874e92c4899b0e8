"""The operator console's routes and the try-it page, over HTTP (tests/test_browser.py drives
both in a real browser): sign-in, the session cookie and what it opens, the console's live
state and its warnings, and the page files."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway import console
from gateway.app import create_app
from shared import keys
from shared.ops.watch import DropWatch
from shared.settings import Settings
from tests.conftest import ADMIN_TOKEN, CouponFactory
from tests.helpers import ADMIN, GatewayProcess, assert_problem, drain, issue
from tests.invariants import Checker
from tests.servers import free_port
from tests.sse import EventReader

HTML = {"Accept": "text/html,application/xhtml+xml"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def sign_in(client: TestClient[Any, Any], token: str = ADMIN_TOKEN) -> dict[str, str]:
    """Sign a console in; the cookie it got, to send explicitly."""
    response = await client.post(
        "/admin/console/session", data={"token": token}, headers=HTML, allow_redirects=False
    )
    assert response.status == 303, await response.text()
    assert response.headers["Location"] == "/admin/console"
    morsel = response.cookies[console.SESSION_COOKIE]
    client.session.cookie_jar.clear()  # the tests send it themselves, or not at all
    return {"Cookie": f"{console.SESSION_COOKIE}={morsel.value}"}


@asynccontextmanager
async def console_stream(
    client: TestClient[Any, Any], headers: dict[str, str]
) -> AsyncIterator[EventReader]:
    response = await client.get("/admin/console/events", headers=headers)
    try:
        reader = EventReader(response)
        yield reader
    finally:
        response.close()


async def state_until(
    reader: EventReader, condition: Callable[[dict[str, Any]], bool], *, within: float = 15.0
) -> dict[str, Any]:
    """Read ``state`` events until one meets ``condition``; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        event, _ = await reader.until("state", within=max(deadline - time.monotonic(), 0.1))
        last = event.data
        if condition(last):
            return last
    raise AssertionError(f"no state met the condition within {within} s; the last: {last}")


def coupon_in(state: dict[str, Any], coupon_id: int) -> dict[str, Any] | None:
    return next((c for c in state["coupons"] if c["id"] == coupon_id), None)


async def test_signed_out_a_browser_gets_the_sign_in_form_and_an_api_client_a_401(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/admin/console", headers=HTML)
    assert response.status == 401
    assert response.content_type == "text/html"
    page = await response.text()
    assert 'action="/admin/console/session"' in page
    assert 'name="token"' in page
    assert "Content-Security-Policy" in response.headers
    await assert_problem(await client.get("/admin/console"), 401, "UNAUTHORIZED")
    await assert_problem(await client.get("/admin/console/events"), 401, "UNAUTHORIZED")


async def test_sign_in_sets_a_strict_http_only_cookie_that_opens_the_console_only(
    client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    response = await client.post(
        "/admin/console/session", data={"token": ADMIN_TOKEN}, allow_redirects=False
    )
    assert response.status == 303
    header = response.headers["Set-Cookie"]
    assert "HttpOnly" in header
    assert "SameSite=Strict" in header
    assert "Path=/admin/console" in header
    assert ADMIN_TOKEN not in header  # a signature of the token, never the token
    cookie = await sign_in(client)
    page = await client.get("/admin/console", headers={**HTML, **cookie})
    assert page.status == 200
    assert 'src="/admin/console/assets/console.js"' in await page.text()
    async with console_stream(client, cookie) as reader:
        await reader.until("state")
    # The cookie opens the console's reads, nothing that changes anything.
    drop = await make_coupon(total=5)
    response = await client.patch(
        f"/admin/coupons/{drop.id}", json={"paused": True}, headers=cookie
    )
    await assert_problem(response, 401, "UNAUTHORIZED")
    await assert_problem(await client.get("/admin/coupons", headers=cookie), 401, "UNAUTHORIZED")


async def test_a_wrong_tampered_or_expired_session_is_refused(
    client: TestClient[Any, Any],
) -> None:
    wrong = await client.post(
        "/admin/console/session", data={"token": "not-the-token-at-all-0000"}, headers=HTML
    )
    assert wrong.status == 401
    assert '<p id="login-error" role="alert">' in await wrong.text()  # the error shown
    response = await client.post("/admin/console/session", data={"token": "nope"})
    await assert_problem(response, 401, "UNAUTHORIZED")
    value = (await sign_in(client))["Cookie"].partition("=")[2]
    expires, name, signature = value.split(".")
    forged = [
        f"{expires}.{name}.{signature[:-1]}{'0' if signature[-1] != '0' else '1'}",
        f"{int(expires) + 1}.{name}.{signature}",  # a longer life, same signature
        # Expired, and signed as such: refused for its age alone.
        console._session_cookie(ADMIN_TOKEN, "admin", time.time() - console.SESSION_SECONDS - 1),
        "²." + value.partition(".")[2],  # a digit to str.isdigit, not to int()
        "junk",
        "",
    ]
    for cookie in forged:
        headers = {"Cookie": f"{console.SESSION_COOKIE}={cookie}", **HTML}
        response = await client.get("/admin/console", headers=headers)
        assert response.status == 401, cookie
        response = await client.get("/admin/console/events", headers=headers)
        await assert_problem(response, 401, "UNAUTHORIZED")


async def test_rotating_the_token_ends_its_sessions(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
) -> None:
    cookie = await sign_in(await aiohttp_client(create_app(settings)))
    rotated = await aiohttp_client(create_app(settings.replace(admin_token="a-new-token-" * 3)))
    response = await rotated.get("/admin/console", headers={**cookie, **HTML})
    assert response.status == 401


async def test_bad_sign_in_requests_get_a_problem_and_no_cookie(
    client: TestClient[Any, Any],
) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"json": {"token": ADMIN_TOKEN}}, 400, "INVALID_REQUEST"),  # not a form
        ({"data": "", "headers": FORM}, 400, "INVALID_REQUEST"),  # no token field
        ({"data": "token=", "headers": FORM}, 400, "INVALID_REQUEST"),
        (
            {"data": {"token": ADMIN_TOKEN}, "headers": {"Origin": "https://elsewhere.example"}},
            403,
            "FORBIDDEN",
        ),
        ({"data": {"token": ADMIN_TOKEN}, "headers": {"Origin": "null"}}, 403, "FORBIDDEN"),
    ]
    for kwargs, status, code in cases:
        response = await client.post("/admin/console/session", allow_redirects=False, **kwargs)
        await assert_problem(response, status, code)
        assert "Set-Cookie" not in response.headers


async def test_sign_out_clears_the_cookie_from_the_console_page_only(
    client: TestClient[Any, Any],
) -> None:
    own = {"Origin": f"http://{client.server.host}:{client.server.port}"}
    response = await client.post("/admin/console/logout", allow_redirects=False, headers=own)
    assert response.status == 303
    assert f"{console.SESSION_COOKIE}=" in response.headers["Set-Cookie"]
    assert "Max-Age=0" in response.headers["Set-Cookie"]
    elsewhere = {"Origin": "https://elsewhere.example"}
    response = await client.post("/admin/console/logout", allow_redirects=False, headers=elsewhere)
    await assert_problem(response, 403, "FORBIDDEN")


async def test_the_cookie_is_secure_behind_a_trusted_https_proxy(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
) -> None:
    proxied = await aiohttp_client(create_app(settings.replace(trusted_proxies="127.0.0.1")))
    for proto, secure in (("https", True), ("http", False)):
        response = await proxied.post(
            "/admin/console/session", data={"token": ADMIN_TOKEN}, allow_redirects=False,
            headers={"X-Forwarded-Proto": proto},
        )  # fmt: skip
        assert response.status == 303
        assert ("Secure" in response.headers["Set-Cookie"]) is secure, proto
    direct = await aiohttp_client(create_app(settings))  # the header of an untrusted peer
    response = await direct.post(
        "/admin/console/session", data={"token": ADMIN_TOKEN}, allow_redirects=False,
        headers={"X-Forwarded-Proto": "https"},
    )  # fmt: skip
    assert "Secure" not in response.headers["Set-Cookie"]


async def test_the_sampling_stops_with_the_last_console_and_starts_afresh(
    client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    drop = await make_coupon(total=5)
    head = await client.head("/admin/console/events", headers=ADMIN)
    assert head.status == 200
    assert head.headers["Content-Type"] == "text/event-stream"
    watching = client.app[console.appkeys.CONSOLE]
    async with console_stream(client, ADMIN) as reader:
        await state_until(reader, lambda s: coupon_in(s, drop.id) is not None)
        async with console_stream(client, ADMIN) as second:
            await second.until("state")
    sampler = watching._sampler
    assert sampler is not None
    await asyncio.wait_for(asyncio.shield(sampler), 5)  # stops once nobody watches
    assert watching._frame is None  # nothing stale for the next console
    async with console_stream(client, ADMIN) as reader:
        first = await state_until(reader, lambda s: coupon_in(s, drop.id) is not None)
        coupon = coupon_in(first, drop.id)
        assert coupon is not None
        assert coupon["history"] == []  # a new history, not one with the idle gap in it


async def test_the_console_follows_a_drop_to_its_sold_out_and_all_issued(
    client: TestClient[Any, Any],
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    check_invariants: Checker,
) -> None:
    drop = await make_coupon(total=20, title="console drop")
    async with console_stream(client, ADMIN) as reader:
        first = await state_until(reader, lambda s: coupon_in(s, drop.id) is not None)
        shown = coupon_in(first, drop.id)
        assert shown is not None
        assert (shown["total"], shown["reserved"], shown["remaining"]) == (20, 0, 20)
        assert shown["sold_out_at"] is None
        assert shown["phase"] == "open"
        answers = {user: (await issue(client, drop.id, user))[0] for user in range(1, 26)}
        accepted = {user for user, status in answers.items() if status == 202}
        assert len(accepted) == 20
        sold = await state_until(
            reader, lambda s: (coupon_in(s, drop.id) or {}).get("remaining") == 0
        )
        coupon = coupon_in(sold, drop.id)
        assert coupon is not None
        assert coupon["reserved"] == coupon["requested"] == 20
        assert coupon["pending"] == 20  # no worker ran yet
        assert coupon["sold_out_at"] is not None
        assert any(w["code"] == "no_workers" for w in sold["warnings"])
        await drain(redis, pool, settings)
        done = await state_until(
            reader, lambda s: (coupon_in(s, drop.id) or {}).get("issued") == 20
        )
        coupon = coupon_in(done, drop.id)
        assert coupon is not None
        assert coupon["pending"] == 0
        assert coupon["dead_lettered"] == 0
        # The chart's points: accepted and issued a second, and the time to issue once rows came.
        history = coupon["history"]
        assert sum(point[1] for point in history) > 0
        assert any(point[3] is not None and point[3] >= 0 for point in history)
    await check_invariants(drop, accepted=accepted, rejected=set(answers) - accepted)


async def test_the_console_warns_when_redis_lost_its_state(
    client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis
) -> None:
    await make_coupon(total=5)
    await redis.delete(keys.STATE_MARKER)
    try:
        async with console_stream(client, ADMIN) as reader:
            state = await state_until(
                reader, lambda s: any(w["code"] == "state_lost" for w in s["warnings"])
            )
            assert "couponctl rebuild" in next(
                w["detail"] for w in state["warnings"] if w["code"] == "state_lost"
            )
    finally:
        await redis.set(keys.STATE_MARKER, "1")


async def test_the_watch_warns_while_mysql_does_not_answer_and_still_shows_redis(
    make_coupon: CouponFactory, redis: Redis
) -> None:
    drop = await make_coupon(total=5)
    # A pool to a port nobody listens on: every query fails to connect, as with MySQL down.
    dead = await aiomysql.create_pool(host="127.0.0.1", port=free_port(), minsize=0)
    try:
        state = await DropWatch(redis, dead).sample()
    finally:
        dead.close()
        await dead.wait_closed()
    assert [w["code"] for w in state["warnings"]] == ["mysql_down", "no_workers"]
    coupon = coupon_in(state, drop.id)
    assert coupon is not None
    assert (coupon["remaining"], coupon["issued"]) == (5, None)  # the Redis half still comes


async def test_the_console_stream_ends_when_the_gateway_stops(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
) -> None:
    client = await aiohttp_client(create_app(settings.replace(shutdown_grace_seconds=30)))
    reader = EventReader(await client.get("/admin/console/events", headers=ADMIN))
    await reader.until("state")
    started = time.monotonic()
    stopping = asyncio.create_task(client.server.close())
    while (event := await reader.next(within=5)) is not None:  # a sample in flight may come
        assert event.name == "state"
    await stopping
    assert time.monotonic() - started < 5  # well before the 30 s grace


async def test_the_try_page_is_served_for_a_coupon_that_exists(
    client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    drop = await make_coupon(total=5)
    response = await client.get(f"/try/{drop.id}")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert 'data-auth="none"' in page
    assert 'src="/pages/try.js"' in page
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    await assert_problem(await client.get("/try/abc"), 400, "INVALID_REQUEST")
    await assert_problem(await client.get(f"/try/{drop.id + 1000}"), 404, "COUPON_NOT_EXIST")


async def test_the_page_files_are_served_by_name_and_nothing_else(
    client: TestClient[Any, Any],
) -> None:
    for path, content_type in [
        ("/pages/try.js", "text/javascript"),
        ("/pages/pages.css", "text/css"),
        ("/admin/console/assets/console.js", "text/javascript"),
        ("/admin/console/assets/pages.css", "text/css"),
    ]:
        response = await client.get(path)
        assert response.status == 200, path
        assert response.content_type == content_type
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in ["/pages/console.js", "/pages/..%2Fopenapi.json", "/admin/console/assets/x.js"]:
        await assert_problem(await client.get(path), 404)


async def test_the_try_page_asks_for_a_token_in_jwt_mode(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
) -> None:
    jwt = settings.replace(auth="jwt", jwt_secret="s" * 32)
    client = await aiohttp_client(create_app(jwt))
    drop = await make_coupon(total=5)
    page = await (await client.get(f"/try/{drop.id}")).text()
    assert 'data-auth="jwt"' in page


async def test_the_console_lives_on_the_admin_listener_when_there_is_one(
    settings: Settings, make_coupon: CouponFactory, tmp_path: Path
) -> None:
    admin_port = free_port()
    drop = await make_coupon(total=3)
    log = tmp_path / "gateway.log"
    with GatewayProcess(settings, log, COUPON_ADMIN_PORT=str(admin_port)) as gateway:
        admin = f"http://127.0.0.1:{admin_port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/admin/console", headers=HTML) as response:
                assert response.status == 404
            async with session.get(f"{gateway.url}/try/{drop.id}") as response:
                assert response.status == 200
            async with session.get(f"{admin}/admin/console", headers={**HTML, **ADMIN}) as response:
                assert response.status == 200
            async with session.get(f"{admin}/admin/console/events", headers=ADMIN) as response:
                state = await state_until(
                    EventReader(response), lambda s: coupon_in(s, drop.id) is not None
                )
                assert state["at"] is not None


async def test_the_watch_shows_no_phantom_backlog_when_redis_miscounts_the_lag(
    client: TestClient[Any, Any],
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
) -> None:
    """Redis derives a group's lag from its entries-read counter, which can be wrong (seen on a
    long-lived ./scripts/run: every entry delivered, lag 20). Set it wrong on purpose: the
    backlog must still be what the stream holds after the last delivered id, nothing."""
    drop = await make_coupon(total=5)
    for user in (1, 2, 3):
        assert (await issue(client, drop.id, user))[0] == 202
    await drain(redis, pool, settings)
    stream = keys.CouponKeys(drop.id).requests
    await redis.execute_command("XGROUP", "SETID", stream, keys.GROUP, "$", "ENTRIESREAD", "0")
    (group,) = await redis.xinfo_groups(stream)
    assert int(group["lag"]) == 3  # the counter is wrong now
    coupon = coupon_in(await DropWatch(redis, pool).sample(), drop.id)
    assert coupon is not None
    assert coupon["pending"] == 0
    assert coupon["backlog"] == {"unread": 0, "unacknowledged": 0, "oldest_age_seconds": 0}
