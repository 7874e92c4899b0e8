"""F9 Redis crash with AOF: redis-server is SIGKILLed under load and restarted on the same data
directory. With ``appendfsync always`` every 202 still becomes a row (asserted: zero lost).
With ``everysec`` the number of lost 202s is measured and reported, not asserted: a process
crash keeps what Redis already wrote to the OS, a power loss could lose up to a second."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.fault.checker import check
from tests.fault.load import LoadClient

RATE = 500


async def _drop_with_redis_kills(stacks, measure, *, appendfsync: str, kills: int) -> None:
    stack = await stacks(appendfsync=appendfsync)
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    # Unlimited stock: the load never runs dry of work before it is stopped.
    coupon = await stack.create_coupon(
        None, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    budget = RATE * (kills * 3 + 30)
    clicks = [(coupon.id, user) for user in range(1, budget + 1)]
    stop = asyncio.Event()
    downtime = 0.0
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=RATE, within=budget / RATE, stop=stop)
        for kill in range(kills):
            await client.wait_for_oks(300 * (kill + 1), within=30)
            client.phase = f"kill{kill}"
            killed = time.monotonic()
            stack.redis_server.kill()
            await stack.redis_server.restart()
            restarted = time.monotonic()
            downtime += restarted - killed
            client.phase = "load"
        # Some load after the last restart too, then stop it.
        await client.wait_for_oks(300 * (kills + 1), within=30)
        stop.set()
        await load
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=60)

    verdict = await check(stack, coupon, client.history, tolerate_lost=appendfsync != "always")
    line = measure(
        verdict.line(
            f"F9 Redis SIGKILL x{kills} appendfsync={appendfsync}",
            downtime=downtime,
            unknown_became_rows=verdict.rows - verdict.ok + len(verdict.lost),
            recovery=drained_at - restarted,
            after_load=drained_at - load_end,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    if appendfsync == "always":
        assert not verdict.lost, line
    assert verdict.unknown > 0, f"no request was caught by a kill: {line}"


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_redis_killed_under_load_keeps_every_acknowledged_request(
    stacks, measure, appendfsync
):
    await _drop_with_redis_kills(stacks, measure, appendfsync=appendfsync, kills=2)


@pytest.mark.slow
@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_redis_killed_ten_times_under_load(stacks, measure, appendfsync):
    await _drop_with_redis_kills(stacks, measure, appendfsync=appendfsync, kills=10)
