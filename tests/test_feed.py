"""The live feed, ``GET /v1/coupons/{id}/events``, on one gateway process: what a subscriber
hears as a drop goes (snapshot, remaining, sold_out, reopened, paused, resumed, started, closed),
resuming from ``Last-Event-ID``, the subscriber bound, bad input, and the end of the stream
when the gateway stops. The events between two states are tested first, without a server."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomysql
import pytest
import structlog
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway import __main__ as gateway_main
from gateway.app import create_app
from gateway.feed import SLOW_CLIENT_BYTES, Subscriber
from gateway.feed_events import Cursor, FeedState, transitions
from shared import keys
from shared.model import Coupon
from shared.settings import Settings
from tests.conftest import CouponFactory
from tests.helpers import ADMIN, assert_problem, drain, issue
from tests.invariants import Checker
from tests.sse import EventReader
from tests.test_openapi import check_against_document
from tests.test_security import AUDIENCE, ISSUER, SECRET

NOW = datetime(2026, 12, 3, 13, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def coupon(total: int | None = 10, *, paused: bool = False, title: str = "drop") -> Coupon:
    return Coupon(
        id=7, title=title, total_quantity=total, discount_amount=1000, min_available_amount=0,
        date_issue_start=NOW, date_issue_end=NOW + timedelta(hours=1), paused=paused,
    )  # fmt: skip


def names(since: FeedState | None, state: FeedState) -> list[str]:
    cursor = None if since is None else Cursor.parse(since.cursor)
    return [name for name, _ in transitions(cursor, state)]


# The events between two states


def test_a_new_subscriber_hears_a_snapshot_of_the_whole_view() -> None:
    state = FeedState.of(coupon(10), 3, NOW_MS)
    assert names(None, state) == ["snapshot"]
    assert state.view() | {"id": 7} == {
        **coupon(10).public(), "remaining": 7, "sold_out": False, "phase": "open",
    }  # fmt: skip


def test_each_kind_of_change_has_its_event() -> None:
    upcoming = FeedState.of(coupon(10), 0, NOW_MS - 1)
    open_ = FeedState.of(coupon(10), 0, NOW_MS)
    assert upcoming.phase == "upcoming"
    assert names(upcoming, open_) == ["started"]
    assert names(open_, FeedState.of(coupon(10), 4, NOW_MS)) == ["remaining"]
    sold_out = FeedState.of(coupon(10), 10, NOW_MS)
    assert names(open_, sold_out) == ["sold_out"]
    assert names(sold_out, FeedState.of(coupon(10), 9, NOW_MS)) == ["reopened"]  # a release
    assert names(sold_out, FeedState.of(coupon(12), 10, NOW_MS)) == ["reopened"]  # a top-up
    assert names(open_, FeedState.of(coupon(10, paused=True), 0, NOW_MS)) == ["paused"]
    assert names(FeedState.of(coupon(10, paused=True), 0, NOW_MS), open_) == ["resumed"]
    closed = FeedState.of(coupon(10), 0, NOW_MS + 3_600_000)
    assert names(open_, closed) == ["closed"]
    assert names(open_, FeedState.of(coupon(10, title="new"), 0, NOW_MS)) == ["snapshot"]
    assert names(open_, open_) == []


def test_a_client_away_for_a_while_hears_every_net_change_in_order() -> None:
    before = FeedState.of(coupon(10), 2, NOW_MS - 1)
    after = FeedState.of(coupon(10, paused=True), 10, NOW_MS + 3_600_000)
    events = transitions(Cursor.parse(before.cursor), after)
    assert [name for name, _ in events] == ["started", "closed", "paused", "sold_out"]
    # Each event leaves the client in a consistent state, and the last one in the newest.
    assert [state.phase for _, state in events] == ["open", "closed", "closed", "closed"]
    assert [state.remaining for _, state in events] == [8, 8, 8, 0]
    assert events[-1][1].cursor == after.cursor
    # Resuming from any event's id goes on from there.
    assert names(events[1][1], after) == ["paused", "sold_out"]


def test_unlimited_stock_has_no_remaining_events() -> None:
    state = FeedState.of(coupon(None), 0, NOW_MS)
    assert state.view()["remaining"] is None
    assert state.view()["sold_out"] is False
    assert names(state, FeedState.of(coupon(None), 500, NOW_MS)) == []
    assert names(FeedState.of(coupon(5), 5, NOW_MS), state) == ["reopened"]


@pytest.mark.parametrize(
    "raw", ["", "junk", "0000000g.o.0.1.1", "00000000.x.0.1.1", "00000000.o.2.1.1", "a" * 65]
)
def test_an_unreadable_last_event_id_starts_afresh(raw: str) -> None:
    assert Cursor.parse(raw) is None
    assert names(None, FeedState.of(coupon(), 0, NOW_MS)) == ["snapshot"]


# The stream, on a gateway


@pytest.fixture
async def feed_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
) -> TestClient[Any, Any]:
    """A gateway whose feed polls and beats fast, so the tests wait little."""
    fast = settings.replace(feed_interval_ms=50, feed_heartbeat_seconds=0.2, max_subscribers=3)
    return await aiohttp_client(create_app(fast))


@asynccontextmanager
async def subscribed(
    client: TestClient[Any, Any], coupon_id: int, last_event_id: str | None = None
) -> AsyncIterator[EventReader]:
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    async with client.get(f"/v1/coupons/{coupon_id}/events", headers=headers) as response:
        yield EventReader(response)


async def test_a_subscriber_follows_a_drop_to_its_sold_out(
    feed_client: TestClient[Any, Any],
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    check_invariants: Checker,
) -> None:
    drop = await make_coupon(total=5)
    async with subscribed(feed_client, drop.id) as feed:
        first = await feed.next()
        assert first is not None
        assert first.name == "snapshot"
        assert first.data["remaining"] == 5
        assert first.data["phase"] == "open"
        assert first.data["date_issue_start"] == drop.public()["date_issue_start"]
        assert feed.retry_ms is not None
        assert settings.feed_retry_ms <= feed.retry_ms <= 2 * settings.feed_retry_ms
        assert (await issue(feed_client, drop.id, 1))[0] == 202
        remaining, _ = await feed.until("remaining")
        assert remaining.data["remaining"] == 4
        for user in range(2, 7):
            await issue(feed_client, drop.id, user)
        sold_out, _ = await feed.until("sold_out")
        assert sold_out.data["remaining"] == 0
        assert sold_out.data["sold_out"] is True
        with pytest.raises(TimeoutError):  # nothing more to tell: heartbeats only
            await feed.next(within=0.5)
        assert feed.comments >= 1
    await drain(redis, pool, settings)
    await check_invariants(drop, accepted={1, 2, 3, 4, 5}, rejected={6})


async def test_pausing_and_topping_up_are_told(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    drop = await make_coupon(total=1)
    async with subscribed(feed_client, drop.id) as feed:
        await feed.until("snapshot")
        assert (await issue(feed_client, drop.id, 1))[0] == 202
        await feed.until("sold_out")
        url = f"/admin/coupons/{drop.id}"
        assert (await feed_client.patch(url, json={"paused": True}, headers=ADMIN)).status == 200
        paused, _ = await feed.until("paused")
        assert paused.data["paused"] is True
        response = await feed_client.patch(
            url, json={"paused": False, "total_quantity": 3}, headers=ADMIN
        )
        assert response.status == 200
        _, seen = await feed.until("reopened")
        assert [e.name for e in seen] == ["resumed", "reopened"]
        assert seen[-1].data["remaining"] == 2
        assert seen[-1].data["total_quantity"] == 3


async def test_the_window_start_and_end_are_told_at_their_moment(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    start = datetime.now(UTC) + timedelta(seconds=1)
    drop = await make_coupon(total=5, start=start, end=start + timedelta(seconds=1))
    async with subscribed(feed_client, drop.id) as feed:
        first = await feed.next()
        assert first is not None
        assert first.data["phase"] == "upcoming"
        started, _ = await feed.until("started", within=3.0)
        told = datetime.now(UTC)
        assert started.data["phase"] == "open"
        assert (await issue(feed_client, drop.id, 1))[0] == 202  # Redis agrees: it is open
        assert told - start < timedelta(seconds=1)
        closed, _ = await feed.until("closed", within=3.0)
        assert closed.data["phase"] == "closed"
        assert (await issue(feed_client, drop.id, 2))[0] == 409


async def test_a_reconnecting_subscriber_misses_nothing(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    drop = await make_coupon(total=3)
    async with subscribed(feed_client, drop.id) as feed:
        snapshot = await feed.next()
        assert snapshot is not None
    # While it is away: one reservation, then the rest and a pause.
    await issue(feed_client, drop.id, 1)
    async with subscribed(feed_client, drop.id, snapshot.id) as feed:
        remaining = await feed.next()
        assert remaining is not None
        assert remaining.name == "remaining"
        assert remaining.data["remaining"] == 2
    await issue(feed_client, drop.id, 2)
    await issue(feed_client, drop.id, 3)
    await feed_client.patch(f"/admin/coupons/{drop.id}", json={"paused": True}, headers=ADMIN)
    async with subscribed(feed_client, drop.id, remaining.id) as feed:
        _, seen = await feed.until("sold_out")
        assert [e.name for e in seen] == ["paused", "sold_out"]
    async with subscribed(feed_client, drop.id, seen[-1].id) as feed:
        # Up to date: nothing to tell but heartbeats, until something happens.
        with pytest.raises(TimeoutError):
            await feed.next(within=0.5)
        assert feed.comments >= 1
    async with subscribed(feed_client, drop.id, "not-an-id") as feed:
        first = await feed.next()
        assert first is not None
        assert first.name == "snapshot"


async def test_the_subscriber_bound_refuses_with_503_and_frees_a_slot_on_leave(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    drop = await make_coupon(total=3)
    async with subscribed(feed_client, drop.id) as a, subscribed(feed_client, drop.id) as b:
        async with subscribed(feed_client, drop.id) as c:
            for feed in (a, b, c):
                assert await feed.next() is not None
            response = await feed_client.get(f"/v1/coupons/{drop.id}/events")
            body = await assert_problem(response, 503, "FEED_FULL")
            assert response.headers["Retry-After"] == "5"
            check_against_document(
                "GET", f"/v1/coupons/{drop.id}/events", 503, response.content_type,
                response.headers, await response.read(),
            )  # fmt: skip
            assert "3" in body["detail"]
        # c left: its slot is free once the gateway notices (at the next heartbeat at most).
        async with asyncio.timeout(3):
            while (response := await feed_client.get(f"/v1/coupons/{drop.id}/events")).status:
                if response.status == 200:
                    break
                await assert_problem(response, 503, "FEED_FULL")
                await asyncio.sleep(0.05)
        response.close()


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/coupons/0/events", 400, "INVALID_REQUEST"),
        ("/v1/coupons/abc/events", 400, "INVALID_REQUEST"),
        ("/v1/coupons/9223372036854775808/events", 400, "INVALID_REQUEST"),
        ("/v1/coupons/424242/events", 404, "COUPON_NOT_EXIST"),
    ],
)
async def test_bad_coupon_ids_get_a_problem_and_hold_no_slot(
    feed_client: TestClient[Any, Any], path: str, status: int, code: str
) -> None:
    for _ in range(4):  # more than the bound of 3: a refused subscriber holds nothing
        await assert_problem(await feed_client.get(path), status, code)


async def test_a_stopping_gateway_ends_its_streams_at_once(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
) -> None:
    client = await aiohttp_client(create_app(settings.replace(shutdown_grace_seconds=30)))
    drop = await make_coupon(total=3)
    response = await client.get(f"/v1/coupons/{drop.id}/events")
    feed = EventReader(response)
    assert await feed.next() is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    stopping = asyncio.create_task(client.server.close())
    assert await feed.next(within=5) is None  # the stream ended
    await stopping
    assert loop.time() - started < 5  # well before the 30 s grace


async def test_head_answers_the_headers_and_holds_no_slot(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    drop = await make_coupon(total=3)
    for _ in range(4):  # more than the bound of 3
        response = await feed_client.head(f"/v1/coupons/{drop.id}/events")
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Request-ID"]


async def test_a_redis_stall_keeps_the_streams_and_the_feed_catches_up_after(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis
) -> None:
    drop = await make_coupon(total=3)
    async with subscribed(feed_client, drop.id) as feed:
        assert await feed.next() is not None
        # Every Redis client waits 1.5 s: three of the gateway's 0.5 s timeouts and more.
        await redis.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        beats = feed.comments
        with pytest.raises(TimeoutError):  # no event, but the stream lives on: heartbeats
            await feed.next(within=1.0)
        assert feed.comments > beats
        await redis.ping()  # the pause is over
        assert (await issue(feed_client, drop.id, 1))[0] == 202
        remaining, _ = await feed.until("remaining", within=3.0)
        assert remaining.data["remaining"] == 2


async def test_subscribers_arriving_during_a_redis_stall_get_503_and_later_ones_read_afresh(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis
) -> None:
    drop = await make_coupon(total=3)
    await redis.execute_command("CLIENT", "PAUSE", 2000, "ALL")
    url = f"/v1/coupons/{drop.id}/events"
    # Three at once: the first one's read times out, and the two waiting behind it are refused
    # with it (all within the pause: one by one, each after its own timeout, would not be).
    answers = await asyncio.gather(*(feed_client.get(url) for _ in range(3)))
    for response in answers:
        await assert_problem(response, 503, "FAIL_COUPON_ISSUE_REQUEST")
    await redis.ping()  # the pause is over
    async with subscribed(feed_client, drop.id) as feed:  # and the next one reads afresh
        assert await feed.next() is not None


async def test_the_feed_is_public_in_jwt_mode_and_rate_limited_per_address(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
) -> None:
    limited = settings.replace(
        auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE, jwt_issuer=ISSUER,
        rate_limit_read_per_second=0.001, rate_limit_read_burst=2,
    )  # fmt: skip
    client = await aiohttp_client(create_app(limited))
    drop = await make_coupon(total=3)
    for _ in range(2):  # no token needed: the feed is public data
        async with subscribed(client, drop.id) as feed:
            assert await feed.next() is not None
    response = await client.get(f"/v1/coupons/{drop.id}/events")
    await assert_problem(response, 429, "RATE_LIMITED")
    assert int(response.headers["Retry-After"]) >= 1


def test_the_gateway_raises_its_open_files_limit_and_warns_when_too_low() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log = structlog.get_logger("test")
    try:
        with capture_logs() as logs:
            enough = max(0, hard - gateway_main._DESCRIPTORS_BESIDES_THE_FEED)
            gateway_main._open_files_for(enough, log)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard  # raised to the hard limit
        assert logs == []  # enough
        with capture_logs() as logs:
            gateway_main._open_files_for(enough + 1, log)  # one descriptor short
        assert [entry["event"] for entry in logs] == ["open_files_limit_low"]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _Transport(asyncio.Transport):
    """A connection whose peer reads nothing: what it was written, and how much is unsent."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.written))

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True


async def test_a_subscriber_that_stops_reading_is_cut_off_and_its_events_are_chunks() -> None:
    transport = _Transport()
    subscriber = Subscriber(transport, chunked=True, sent="")
    assert subscriber.write(b"event: x\n\n")
    assert transport.written == [b"a\r\nevent: x\n\n\r\n"]  # the response's chunked framing
    while subscriber.write(b"." * 4096):  # nothing is read: the unsent bytes grow
        assert transport.get_write_buffer_size() <= SLOW_CLIENT_BYTES + 4096 + 16
    assert transport.closed
    assert not subscriber.write(b"more")  # gone for good
    plain = _Transport()
    assert Subscriber(plain, chunked=False, sent="").write(b"data")
    assert plain.written == [b"data"]  # an HTTP/1.0 client: the body as it is


async def test_an_http_1_0_client_gets_the_events_unframed(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory
) -> None:
    drop = await make_coupon(total=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", feed_client.server.port)
    writer.write(f"GET /v1/coupons/{drop.id}/events HTTP/1.0\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert (await issue(feed_client, drop.id, 1))[0] == 202
    body = await asyncio.wait_for(reader.readuntil(b"event: sold_out\n"), 5)
    assert body.startswith(b"retry: ")
    assert b"event: snapshot\n" in body
    writer.close()


async def test_a_coupon_that_cannot_be_read_holds_up_no_other(
    feed_client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis
) -> None:
    broken, fine = await make_coupon(total=3), await make_coupon(total=3)
    async with subscribed(feed_client, broken.id) as a, subscribed(feed_client, fine.id) as b:
        assert await a.next() is not None
        assert await b.next() is not None
        # Only someone with Redis access can write this; the gateway must not stall on it.
        await redis.hset(keys.CouponKeys(broken.id).meta, "total", "not a number")
        await redis.publish(keys.CHANGES_CHANNEL, broken.id)  # the cache forgets the good copy
        assert (await issue(feed_client, fine.id, 1))[0] == 202
        remaining, _ = await b.until("remaining", within=3.0)
        assert remaining.data["remaining"] == 2
        with pytest.raises(TimeoutError):  # the broken one keeps its last state, quietly
            await a.next(within=0.5)
    await redis.hset(keys.CouponKeys(broken.id).meta, "total", 3)  # for the fixture's checks
