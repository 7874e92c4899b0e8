"""The live feed across gateway processes, and at scale: real ``python -m gateway`` processes on
real Redis. A drop sold out through one process is told to the subscribers of every other one;
a subscriber resumes on another process than the one it left; one process holds 5,000
subscribers within its memory bound and tells every one of them."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
from redis.asyncio import Redis

from shared.settings import Settings
from tests.conftest import CouponFactory
from tests.helpers import GatewayProcess, assert_problem, drain
from tests.invariants import Checker
from tests.sse import EventReader, RawSubscriber

SUBSCRIBERS_PER_PROCESS = 100
MANY = 5_000
BYTES_PER_SUBSCRIBER = 32 * 1024
"""The memory bound one subscriber may cost its gateway process (measured: about 14 KiB)."""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def sell(base: str, coupon_id: int, users: range) -> tuple[set[int], set[int]]:
    """Issue a request for each user through ``base``: (accepted, sold out)."""
    accepted, sold_out = set(), set()
    async with aiohttp.ClientSession() as session:
        for user in users:
            url = f"{base}/v1/coupons/{coupon_id}/issues"
            async with session.post(url, json={"user_id": user}) as response:
                body: dict[str, Any] = await response.json(content_type=None)
                if response.status == 202:
                    accepted.add(user)
                else:
                    assert body["code"] == "INVALID_COUPON_ISSUE_QUANTITY", body
                    sold_out.add(user)
    return accepted, sold_out


async def test_a_drop_sold_out_by_one_process_is_told_by_every_other(
    settings: Settings,
    tmp_path: Path,
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
    check_invariants: Checker,
) -> None:
    drop = await make_coupon(total=20)
    with ExitStack() as stack:
        a, b, seller = (
            stack.enter_context(GatewayProcess(settings, tmp_path / f"gateway-{n}.log"))
            for n in range(3)
        )
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            responses = [
                await session.get(f"{gateway.url}/v1/coupons/{drop.id}/events")
                for gateway in (a, b)
                for _ in range(SUBSCRIBERS_PER_PROCESS)
            ]
            feeds = [EventReader(response) for response in responses]
            firsts = await asyncio.gather(*(feed.next() for feed in feeds))
            assert {(e.name, e.data["remaining"]) for e in firsts if e is not None} == {
                ("snapshot", 20)
            }
            assert len(firsts) == 2 * SUBSCRIBERS_PER_PROCESS
            accepted, sold_out = await sell(seller.url, drop.id, range(1, 26))
            assert len(accepted) == 20
            told = await asyncio.gather(*(feed.until("sold_out", within=5) for feed in feeds))
            assert all(event.data["remaining"] == 0 for event, _ in told)
            # A subscriber that left process a before the drop resumes on process b.
            resumed = await session.get(
                f"{b.url}/v1/coupons/{drop.id}/events", headers={"Last-Event-ID": firsts[0].id}
            )
            event = await EventReader(resumed).next()
            assert event is not None
            assert (event.name, event.data["remaining"]) == ("sold_out", 0)
            for response in [*responses, resumed]:
                response.close()
    await drain(redis, pool, settings)
    await check_invariants(drop, accepted=accepted, rejected=sold_out)


async def test_one_process_holds_5000_subscribers_within_its_bound_and_tells_them_all(
    settings: Settings,
    tmp_path: Path,
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
    check_invariants: Checker,
) -> None:
    drop = await make_coupon(total=10)
    bounded = settings.replace(max_subscribers=MANY, request_log_sample=0.0)
    with GatewayProcess(bounded, tmp_path / "gateway.log") as gateway:
        path = f"/v1/coupons/{drop.id}/events"
        port = gateway.port
        first = await RawSubscriber.open("127.0.0.1", port, path)
        before = rss_bytes(gateway.pid)
        subscribers = [first]
        for _ in range(MANY // 500):  # in waves, as clients arrive; the listen queue is 4,096
            wave = len(subscribers)
            subscribers += await asyncio.gather(
                *(RawSubscriber.open("127.0.0.1", port, path) for _ in range(min(500, MANY - wave)))
            )
        assert len(subscribers) == MANY
        per_subscriber = (rss_bytes(gateway.pid) - before) / (MANY - 1)
        assert per_subscriber < BYTES_PER_SUBSCRIBER, f"{per_subscriber:.0f} bytes a subscriber"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}{path}") as response:
                await assert_problem(response, 503, "FEED_FULL")
            accepted, sold_out = await sell(gateway.url, drop.id, range(1, 12))
        await asyncio.wait_for(
            asyncio.gather(*(subscriber.until(b"sold_out") for subscriber in subscribers)), 20
        )
        for subscriber in subscribers:
            subscriber.close()
    print(f"{per_subscriber:.0f} bytes of gateway memory per subscriber")
    await drain(redis, pool, settings)
    await check_invariants(drop, accepted=accepted, rejected=sold_out)
