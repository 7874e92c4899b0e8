"""F11 Redis stall: redis-server is frozen (SIGSTOP) under load, then continued. Requests fail
fast with 503 (bounded by the gateway's Redis timeout, not by the stall), no answer reaches
the wrong request, and once Redis runs again everything drains with I1–I6 intact.

The latency bound is deliberately generous (a multiple of ``COUPON_REDIS_TIMEOUT_SECONDS``,
and below the stall's length, so that "waited for Redis to come back" would fail it); the
measured p50/p99/max are reported."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.fault.checker import check
from tests.fault.load import LoadClient, percentile

REDIS_TIMEOUT = 0.5


async def _drop_through_redis_stall(stacks, measure, *, stall: float, users: int) -> None:
    stack = await stacks(redis_timeout_seconds=REDIS_TIMEOUT)
    gateway = await stack.start_gateway()
    await stack.start_worker(0)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        users, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    rate = 300
    clicks = [(coupon.id, user) for user in range(1, users + 1)]
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=rate, within=users / rate + 60)
        await client.wait_for_oks(200, within=30)
        client.phase = "stall"
        stack.redis_server.pause()
        # The fault's duration.
        await asyncio.sleep(stall)
        stack.redis_server.resume()
        resumed = time.monotonic()
        client.phase = "after"
        await load
    drained_at = await stack.wait_drained([coupon.id], within=60)

    verdict = await check(stack, coupon, client.history)
    in_stall = [a for a in client.history.answers if a.phase == "stall"]
    refused = [a.latency for a in in_stall if a.status == 503]
    bound = min(6 * REDIS_TIMEOUT, stall - 0.1)
    line = measure(
        verdict.line(
            f"F11 Redis SIGSTOP {stall:.0f} s",
            sent_in_stall=len(in_stall),
            answered_503=len(refused),
            p50_503=percentile(refused, 0.5),
            p99_503=percentile(refused, 0.99),
            max_503=max(refused, default=0.0),
            recovery=drained_at - resumed,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert refused, f"no request was refused during the stall: {line}"
    slow = sorted(latency for latency in refused if latency > bound)
    assert not slow, f"503s slower than {bound} s: {slow[:10]}\n{line}"
    # 503 or a definite answer; never a client-side timeout or another error.
    statuses = client.history.statuses(phase="stall")
    others = {s: n for s, n in statuses.items() if not s.startswith(("202", "409", "503"))}
    assert not others, f"{others}\n{line}"


async def test_redis_frozen_under_load_answers_503_fast_and_never_crosses_replies(stacks, measure):
    await _drop_through_redis_stall(stacks, measure, stall=3.0, users=2_500)


@pytest.mark.slow
async def test_redis_frozen_10_seconds_under_load(stacks, measure):
    await _drop_through_redis_stall(stacks, measure, stall=10.0, users=6_000)
